"""The command line and the runner used in ways the other tests do not: option order, a missing extra, ..."""

import json
import os
import sys

import pytest

from helpers import tiny_settings
from quotient_sgd.cli import main
from quotient_sgd.config import ConfigError, load_config, validate
from quotient_sgd.runner import report, run, sweep
from quotient_sgd.runner._rundir import write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _run_dir_of_tiny(path):
    """A directory holding ``configs/tiny.py`` as it is (200 steps, lr 0.05): a command whose config differs is
    refused before anything is built, naming the differing keys, which shows what the command parsed."""
    os.makedirs(path)
    write_config(os.path.join(path, "config.json"), validate(load_config(TINY)))
    return str(path)


@pytest.mark.parametrize("config_args", [[f"--config={TINY}"], ["--config", TINY]])
def test_overrides_written_before_the_config_file_apply_to_it(tmp_path, capsys, config_args):
    """``--config.steps=3 --config=FILE`` is the same command as ``--config=FILE --config.steps=3`` (it was refused:
    "Found --config.steps=3 in argv before a value for --config was specified"); a key given twice takes its last
    value, as when the file comes first."""
    wd = _run_dir_of_tiny(tmp_path / "d")
    argv = ["quotient-sgd", "run", "--config.steps=3", "--config.optim.lr=0.5", *config_args,
            "--config.optim.lr=0.01", f"--workdir={wd}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "before a value for --config" not in err
    assert "steps: 200 (in the directory) != 3 (now)" in err, err
    assert "optim.lr: 0.05 (in the directory) != 0.01 (now)" in err, err
    assert os.listdir(wd) == ["config.json"]


def test_tensorboard_without_tensorboardx_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    """``logging.tensorboard=True`` where tensorboardX is not installed: exit status 2 and a message naming the key
    and what to do, no directory (it was a RuntimeError traceback after the model was built and the directory
    written)."""
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import tensorboardX -> ImportError
    wd = str(tmp_path / "r")
    assert main(["quotient-sgd", "run", f"--config={TINY}", "--config.logging.tensorboard=True",
                 f"--workdir={wd}"]) == 2
    err = capsys.readouterr().err
    assert "config.logging.tensorboard = True" in err and "tensorboardX" in err and "Traceback" not in err, err
    assert not os.path.exists(wd)
    s = tiny_settings(**{"logging.tensorboard": True})
    for call, name in ((run, "r2"), (sweep, "s")):
        with pytest.raises(ConfigError, match="logging.tensorboard"):
            call(s, str(tmp_path / name))
        assert not os.path.exists(tmp_path / name)


def test_overrides_in_every_spelling_ml_collections_applies_are_checked(tmp_path, capsys):
    """``-config.KEY=V`` (one dash) is applied by ml_collections like ``--config.KEY=V``: an override the run would not
    read is refused the same way (it ran, ignoring it), and ``report`` refuses it as it refuses ``--config.KEY``."""
    wd = str(tmp_path / "r")
    for bad, said in ((["-config.model.channels=(3,)"], "config.model.channels = (3,): this override would have no "
                                                         "effect"),
                      (["-config.optim.b1=0.5"], "config.optim.b1 = 0.5: this override would have no effect")):
        assert main(["quotient-sgd", f"--config={TINY}", *bad, "run", f"--workdir={wd}"]) == 2
        err = capsys.readouterr().err
        assert said in err, err
        assert not os.path.exists(wd)
    assert main(["quotient-sgd", "report", "-config.steps=3", str(tmp_path)]) == 2
    assert "--config.steps: `report` takes only the run or sweep directory" in capsys.readouterr().err


def test_the_sweep_table_names_the_step_its_wall_time_starts_from(tmp_path):
    """(Fast variant of the next test.)  ``report`` on a sweep whose ``sweep.json`` records ``resumed_from``."""
    s = tiny_settings(20, **{"sweep.lr": (0.05,), "sweep.seed": (0,)})
    wd = tmp_path / "sw"
    os.makedirs(wd)
    meta = {"config": s.to_dict(), "members": [{"seed": 0, "lr": 0.05}], "num_devices": 1, "num_processes": 1,
            "members_per_device": 1, "schedule": [{"from_step": 0, "members_per_device": 1}], "decided": True,
            "measured_cost": {}, "wall_s": 1.25, "resumed_from": 10}
    with open(wd / "sweep.json", "w") as f:
        json.dump(meta, f)
    assert "- wall time: 1.2 s (of the command that resumed the sweep from step 10)" in report(str(wd)).splitlines()


@pytest.mark.slow
def test_a_resumed_sweep_says_its_wall_time_is_that_of_the_resuming_command(tmp_path):
    """The wall time of a sweep is that of the command that finished it; after a resume the table said only
    "wall time: X s", as if the whole sweep had taken X s.  It now names the step the command resumed from (as a
    run's summary does), in ``sweep.json`` too, and keeps it when the finished sweep is run again or reported."""
    import jax

    s = tiny_settings(20, **{"sweep.lr": (0.05,), "sweep.seed": (0,)})
    wd = str(tmp_path / "sw")
    sweep(s, wd, members_per_device=1, devices=jax.devices()[:1], max_chunks=1)
    out = sweep(s, wd, members_per_device=1, devices=jax.devices()[:1])
    assert out.resumed_from == 10
    with open(os.path.join(wd, "sweep.json")) as f:
        assert json.load(f)["resumed_from"] == 10
    line = f"- wall time: {out.wall_s:.1f} s (of the command that resumed the sweep from step 10)"
    for again in (lambda: None, lambda: sweep(s, wd, members_per_device=1, devices=jax.devices()[:1]),
                  lambda: report(wd)):
        again()
        with open(os.path.join(wd, "summary.md")) as f:
            assert line in f.read().splitlines()


def test_a_config_file_imports_the_modules_beside_it(tmp_path, capsys, monkeypatch):
    """``configs/derived.py`` doing ``from probe5_base import get_config`` loads whatever the working directory (it
    loaded only from its own directory, and there only when the command re-executed itself with ``python -m``)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "probe5_base", raising=False)
    cfgs = tmp_path / "cfgs"
    cfgs.mkdir()
    (cfgs / "probe5_base.py").write_text(
        "from quotient_sgd.config import default_config\n\n\ndef get_config():\n    c = default_config()\n"
        "    c.name = 'base'\n    c.data.name = 'teacher_student'\n    c.data.batch_size = 16\n    return c\n")
    (cfgs / "derived.py").write_text(
        "from probe5_base import get_config as base\n\n\ndef get_config():\n    c = base()\n    c.name = 'derived'\n"
        "    c.steps = 7\n    return c\n")
    assert load_config(str(cfgs / "derived.py")).steps == 7
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(cfgs)])
    monkeypatch.delitem(sys.modules, "probe5_base")
    afile = tmp_path / "afile"
    afile.write_text("")
    # a workdir that is a file: refused once the config has loaded (nothing is built)
    assert main(["quotient-sgd", "run", f"--config={cfgs / 'derived.py'}", "--config.steps=3",
                 f"--workdir={afile}"]) == 2
    err = capsys.readouterr().err
    assert "exists and is not a directory" in err, err


def test_config_given_twice_is_refused_naming_both_files(tmp_path, capsys):
    """``--config=A --config B``: absl loaded B while the checks of the config file read A (a missing A was refused
    although B exists; a valid A let an invalid B through).  Refused, naming both, nothing written."""
    wd = str(tmp_path / "r")
    digits = os.path.join(ROOT, "configs", "digits_cnn.py")
    for second in ([f"--config={digits}"], ["--config", digits]):
        assert main(["quotient-sgd", "run", f"--config={TINY}", *second, f"--workdir={wd}"]) == 2
        err = capsys.readouterr().err
        assert f"--config is given 2 times ({TINY!r}, {digits!r})" in err, err
        assert not os.path.exists(wd)


def test_an_option_written_where_a_value_belongs_is_refused(tmp_path, capsys, monkeypatch):
    """``--workdir --config.steps=3`` (the directory forgotten): absl took the option as the directory, so the run
    wrote into a directory named "--config.steps=3" with the override dropped (``--config.name --workdir=out``
    named the run "--workdir=out").  Refused, nothing written."""
    monkeypatch.chdir(tmp_path)
    for argv, said in ((["--workdir", "--config.steps=3"], "--workdir needs a directory"),
                       (["--workdir", "-config.steps=3"], "--workdir needs a directory"),
                       (["--config.name", "--workdir=out"], "--config.name needs a value")):
        assert main(["quotient-sgd", "run", f"--config={TINY}", *argv]) == 2
        err = capsys.readouterr().err
        assert f"{said}, got the option {argv[1]!r}" in err, err
        assert os.listdir(tmp_path) == []


def test_sweep_refuses_an_override_of_a_setting_its_axes_replace(tmp_path, capsys):
    """``quotient-sgd sweep --config=configs/tiny.py --config.optim.lr=0.01``: tiny sweeps ``lr`` over (0.02, 0.05),
    so every member took its lr from the axis and the override was silently ignored (as ``seed`` with
    ``sweep.seed``).  Refused like the other overrides that would have no effect, naming the axis; with the axis
    emptied the override is read and passes."""
    wd = str(tmp_path / "sw")
    for over, axis in (("--config.optim.lr=0.01", "sweep.lr = (0.02, 0.05)"),
                       ("--config.seed=5", "sweep.seed = (0, 1, 2, 3)")):
        assert main(["quotient-sgd", "sweep", f"--config={TINY}", over, f"--workdir={wd}"]) == 2
        err = capsys.readouterr().err
        assert f"config.{over[len('--config.'):].replace('=', ' = ')}: this override would have no effect" in err, err
        assert f"every member of the sweep takes it from {axis}" in err, err
        assert not os.path.exists(wd)
    afile = tmp_path / "afile"  # refused after the override checks, before anything is built
    afile.write_text("")
    assert main(["quotient-sgd", "sweep", f"--config={TINY}", "--config.optim.lr=0.01", "--config.sweep.lr=()",
                 "--config.seed=5", "--config.sweep.seed=()", f"--workdir={afile}"]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
