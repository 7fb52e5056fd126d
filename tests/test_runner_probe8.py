"""Configs, runner and CLI: a plain ``ml_collections.ConfigDict`` config, interrupts while plotting, the run
directory lock of a multi-host sweep, and what the run directory records."""

from __future__ import annotations

import os

import ml_collections
import pytest

from quotient_sgd.cli import main
from quotient_sgd.config import ConfigError, default_config, load_config, validate

_PLAIN = ("import ml_collections\n"
          "import numpy as np\n"
          "from quotient_sgd.config import default_config\n\n\n"
          "def get_config():\n"
          "    config = ml_collections.ConfigDict(default_config().to_dict(){kw})\n"
          "    {line}\n"
          "    return config\n")


@pytest.mark.parametrize("line,key,kind", [
    ("config.optim.lr = True", "lr", "a float"),
    ("config.optim.weight_decay = np.bool_(False)", "weight_decay", "a float"),
    ("config.steps = True", "steps", "an int"),
])
@pytest.mark.parametrize("kw", ["", ", type_safe=False"])
def test_plain_configdict_bool_for_a_number_is_refused(tmp_path, line, key, kind, kw):
    """A config file building its config from ``ml_collections.ConfigDict`` (not ``default_config()``): writing
    ``config.optim.lr = True`` stored ``1.0`` (ml_collections casts an int to a float key, and a bool is an int),
    and the run trained at lr 1.0; now the assignment is refused, naming the key and the value."""
    path = tmp_path / "plain.py"
    path.write_text(_PLAIN.format(kw=kw, line=line))
    with pytest.raises(TypeError, match=rf"'{key}'.*is a bool, and the key holds {kind}"):
        load_config(path)
    # outside the config file's load, ml_collections is left as it was
    c = ml_collections.ConfigDict({"lr": 0.1})
    c.lr = True
    assert c.lr == 1.0 and isinstance(c.lr, float)


def test_plain_configdict_from_scratch_keeps_bool_for_validation(tmp_path):
    """A plain ``ConfigDict`` built from a dict holding ``lr: True`` keeps the bool, and validation refuses it;
    a number assigned to a numeric key still loads (an int to a float key as the float)."""
    path = tmp_path / "scratch.py"
    path.write_text(_PLAIN.format(kw="", line="config.optim.lr = 1"))
    cfg = load_config(path)
    assert validate(cfg).optim.lr == 1.0
    d = default_config().to_dict()
    d["optim"]["lr"] = True
    with pytest.raises(ConfigError, match=r"config\.optim\.lr = True: expected a float, got bool"):
        validate(ml_collections.ConfigDict(d))


def test_cli_plain_configdict_bool_lr_is_refused(tmp_path, monkeypatch, capsys):
    path = tmp_path / "cfg" / "plain.py"
    path.parent.mkdir()
    path.write_text(_PLAIN.format(kw="", line="config.optim.lr = True"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code = main(["quotient-sgd", "run", f"--config={path}", f"--workdir={work / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"config.optim.lr = True (in {path}, line 8): expected a float, got bool" in err, err
    assert "Traceback" not in err and os.listdir(work) == []


class _InterruptedInit:
    """A meta-path finder whose module raises as a pybind11 extension does when Ctrl-C lands in its
    initialisation: ``ImportError("initialization failed")`` raised from the ``KeyboardInterrupt``."""

    def __init__(self, name):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        import importlib.util

        return importlib.util.spec_from_loader(fullname, self) if fullname == self.name else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise ImportError("initialization failed") from e


def test_plt_raises_the_interrupt_not_the_import_error(monkeypatch):
    """Ctrl-C during the first import of matplotlib (its pybind11 modules make of it an ImportError) reaches the
    caller as the KeyboardInterrupt."""
    import sys

    from quotient_sgd.runner import _report

    monkeypatch.delitem(sys.modules, "matplotlib.pyplot", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_InterruptedInit("matplotlib.pyplot"), *sys.meta_path])
    with pytest.raises(KeyboardInterrupt):
        _report._plt()
    monkeypatch.setattr(sys, "meta_path", [_InterruptedInit("matplotlib.pyplot.other"), *sys.meta_path[1:]])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an ImportError of another cause stays one
    with pytest.raises(ImportError):
        _report._plt()


def test_prefetch_thread_failure_prints_nothing(monkeypatch):
    """The background import of pyplot failing (an interrupted import left matplotlib broken) printed an
    ImportError traceback from its thread after the command's interrupt message."""
    import sys
    import threading

    from quotient_sgd.runner import _report

    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_type))
    monkeypatch.delitem(sys.modules, "matplotlib.pyplot", raising=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    before = set(threading.enumerate())
    _report.prefetch_plotting()
    for t in set(threading.enumerate()) - before:
        t.join(10)
    assert seen == []


@pytest.mark.parametrize("cmd", ["run", "report"])
def test_cli_interrupt_raised_as_import_error_exits_130(tmp_path, monkeypatch, capsys, cmd):
    """The command reports an interrupt that a library re-raised as another exception (an ImportError from a
    KeyboardInterrupt) as the interrupt: the clean message and status 130, no traceback."""
    import quotient_sgd.runner as runner

    def interrupted(*a, **k):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise ImportError("initialization failed") from e

    monkeypatch.setattr(runner, cmd, interrupted)
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "r"
    argv = (["quotient-sgd", "run", "--config.steps=2", f"--workdir={work}"] if cmd == "run"
            else ["quotient-sgd", "report", str(work)])
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err and "ImportError" not in err, err


def test_run_into_a_sweep_member_directory_is_refused(tmp_path):
    """``quotient-sgd run --workdir=<sweep>/members/000`` with the member's resolved config resumed the member as a
    run (adding checkpoints/, rewriting run.json, truncating and appending its metric rows), unlocked: the
    sweep's lock is on the sweep directory.  It is refused, and nothing is written."""
    import json

    from quotient_sgd.runner import RunDirError
    from quotient_sgd.runner._rundir import check_workdir
    from tests.helpers import tiny_settings

    s = tiny_settings(steps=4)
    member = tmp_path / "sw" / "members" / "000"
    member.mkdir(parents=True)
    (member / "config.json").write_text(json.dumps(s.to_dict()))
    assert check_workdir(str(member), s) is True  # a run directory holding this config: resumed ...
    (tmp_path / "sw" / "sweep.json").write_text("{}")
    before = sorted(os.listdir(member))
    with pytest.raises(RunDirError, match=r"is a member directory of the sweep .*sw"):
        check_workdir(str(member), s)  # ... not when it is a sweep's member
    assert sorted(os.listdir(member)) == before


def test_override_of_a_key_the_file_set_to_none_names_the_file_error(tmp_path, monkeypatch, capsys):
    """A config file setting ``config.steps = None``, run with ``--config.steps=2``: ml_collections refuses to
    override a None field ("Type <class 'NoneType'> of field config.steps is not supported for overriding"); the
    command now says what is wrong in the file, and writes nothing."""
    path = tmp_path / "cfg" / "none.py"
    path.parent.mkdir()
    path.write_text("from quotient_sgd.config import default_config\n\n\ndef get_config():\n"
                    "    config = default_config()\n    config.steps = None\n    return config\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code = main(["quotient-sgd", "run", f"--config={path}", "--config.steps=2", f"--workdir={work / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"config.steps = None: expected an int, got NoneType (in {path}, before any --config.* override)" in err
    assert "not supported for overriding" not in err and os.listdir(work) == []


_EXPERIMENT_CONFIGS = ("catapult", "edge_of_stability", "hj_slices", "normalised_cnn", "shock_lr")


@pytest.mark.parametrize("name", _EXPERIMENT_CONFIGS)
def test_every_experiment_config_is_named_as_not_a_run_config(name):
    """Each experiment config of configs/ given to `run` / `sweep` says that it is not a run config and where it
    runs (README).  configs/hj_slices.py, whose ``model`` key is a tuple of overrides (not a run section), got
    "config.checkpoints: unknown key (did you mean 'checkpoint'?)" instead."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", f"{name}.py")
    with pytest.raises(ConfigError, match=r"it is not a run config .*python experiments/<name>\.py"):
        validate(load_config(path))
