"""The runner, its config validation and the CLI on cases around the edges of a run: reports of runs killed
mid-write, run directories from another version, run names that are not directory names, and symmetry settings
of models that declare no symmetry."""

import json
import os

import numpy as np
import pytest

from quotient_sgd.cli import main
from quotient_sgd.config import ConfigError, load_config, validate
from quotient_sgd.runner._rundir import MetricsLog, TrajectoryParts, read_metrics, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _cli(*args):
    return main(["quotient-sgd", *args])


def _tiny(**overrides):
    return validate(load_config(TINY, overrides))


def _killed_run(d, steps_done=5, torn=True):
    """A run directory as a run of ``configs/tiny.py`` killed while appending the rows of its second chunk:
    ``config.json``, one trajectory part, the rows of the first chunk, and a torn last line."""
    s = _tiny(**{"steps": 10, "checkpoint.every": steps_done})
    os.makedirs(d)
    write_json(os.path.join(d, "config.json"), s.to_dict())
    loss = np.linspace(1.0, 0.5, steps_done, dtype=np.float32)
    TrajectoryParts(str(d)).write(0, {"loss": loss, "step": np.arange(steps_done, dtype=np.int64)})
    MetricsLog(os.path.join(d, "metrics.jsonl")).append(
        [{"step": 0, "loss": loss[0]}, {"step": steps_done - 1, "loss": loss[-1], "test_loss": 0.7, "train_loss": 0.6}])
    if torn:
        with open(os.path.join(d, "metrics.jsonl"), "a") as f:
            f.write('{"step": 5, "loss": 0.4')
    return s


def test_read_metrics_stops_at_a_torn_last_line(tmp_path):
    """A run killed while appending to metrics.jsonl leaves a torn last line; reading the rows keeps the complete
    ones (it raised JSONDecodeError), as resuming does (MetricsLog.truncate drops the torn line)."""
    _killed_run(tmp_path / "r")
    with pytest.warns(RuntimeWarning, match="line 3 is not a complete JSON row"):
        rows = read_metrics(str(tmp_path / "r" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [0, 4]
    MetricsLog(str(tmp_path / "r" / "metrics.jsonl")).truncate(10)
    assert read_metrics(str(tmp_path / "r" / "metrics.jsonl")) == rows


def test_report_of_a_run_killed_while_appending_metrics(tmp_path, capsys):
    """`quotient-sgd report` on the directory of a run killed mid-append: the summary of the steps it has (it was
    a JSONDecodeError traceback)."""
    d = tmp_path / "r"
    _killed_run(d)
    with pytest.warns(RuntimeWarning, match="line 3 is not a complete JSON row"):
        code = _cli("report", str(d))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in err and "steps: 5 of 10" in out, (out, err)
    assert os.path.exists(d / "summary.md")


def test_report_of_a_config_json_the_schema_does_not_accept_is_an_error(tmp_path, capsys):
    """A run directory whose config.json has a key this version does not know (written by another version):
    `report` says so, naming the directory and the key, status 2 (it was a ConfigError traceback)."""
    d = tmp_path / "r"
    _killed_run(d, torn=False)
    with open(d / "config.json") as f:
        cfg = json.load(f)
    cfg["optim"]["old_key"] = 1
    with open(d / "config.json", "w") as f:
        json.dump(cfg, f)
    code = _cli("report", str(d))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and repr(str(d)) in err and "config.optim.old_key: unknown key" in err, err


@pytest.mark.parametrize("name", [".", ".."])
def test_run_names_that_are_not_directory_names_are_refused(name):
    """``name`` is the default run directory ``runs/<name>``: '.' made ``runs/`` itself the run directory (and the
    next run a directory inside it), '..' the current directory.  Refused naming the key and the value."""
    with pytest.raises(ConfigError, match=r"config\.name = '\.+': .*other than '\.' and '\.\.'"):
        _tiny(name=name)
    assert _tiny(name="a b ü").name == "a b ü"


@pytest.mark.parametrize("key, value", [
    ("symmetry.mode", "gauge_fix"), ("symmetry.mode", "horizontal"), ("observables.hessian_every", 5),
    ("observables.names", ("loss", "grad_norm")),
])
def test_settings_that_need_a_symmetry_on_a_model_without_one_are_refused(key, value):
    """An MLP without hidden layers declares no symmetry: a run of it has no group, trained plainly and recording
    the loss only.  Gauge fixing, horizontal projection, the quotient Hessian and quotient observables asked of it
    were silently dropped; they are refused naming the key and the value."""
    base = {"model.hidden": (), "observables.names": (), "sweep.lr": (), "sweep.seed": ()}
    assert validate(load_config(TINY, base)).model.hidden == ()
    with pytest.raises(ConfigError, match=rf"config\.{key} = {value!r}".replace("(", r"\(").replace(")", r"\)")
                       + ".*declares no symmetry"):
        validate(load_config(TINY, {**base, key: value}))


def test_observables_asked_of_a_run_with_the_symmetry_off_are_refused():
    """With ``symmetry.enabled=False`` a run records the loss only: observables named explicitly were dropped
    without a word (the Hessian and the noise were refused already); refused naming the key."""
    with pytest.raises(ConfigError, match=r"config\.observables\.names = .*symmetry\.enabled=False"):
        _tiny(**{"symmetry.enabled": False})
    assert not _tiny(**{"symmetry.enabled": False, "observables.names": ("loss",)}).symmetry.enabled


@pytest.mark.parametrize("opt", ["adam", "adamw"])
def test_nesterov_with_adam_is_refused(opt):
    """``optim.nesterov`` is read by SGD only: with Adam(W) it was ignored without a word (as momentum is
    refused there)."""
    with pytest.raises(ConfigError, match=r"config\.optim\.nesterov = True: only for optim\.name='sgd'"):
        _tiny(**{"optim.name": opt, "optim.momentum": 0.0, "optim.nesterov": True})
    assert _tiny(**{"optim.nesterov": True}).optim.nesterov
