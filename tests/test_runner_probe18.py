"""Runs and sweeps as a researcher meets them: TensorBoard over the event files of an earlier command that computed
from step 0 again; an unknown config key spelt in other capitals is pointed to its spelling; the command without a
subcommand; a config file that ends the program;
--workdir given as a file with a trailing slash, or as a link to nothing; the sweep's
loss plot beside a diverged member."""

import os

import jax
import numpy as np
import pytest

from helpers import load_metric_rows, read_tensorboard, tiny_settings
from quotient_sgd.cli import main
from quotient_sgd.config import ConfigError, default_config, validate
from quotient_sgd.runner import run, sweep

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")


def _tensorboard_points(run_dir) -> tuple[dict, dict]:
    """``(shown, rows)``: the ``(step, value)`` points TensorBoard shows per tag, and those ``metrics.jsonl``
    holds (finite values, as float32: TensorBoard's scalars are float32)."""
    rows: dict[str, list] = {}
    for r in load_metric_rows(run_dir):
        for k, v in r.items():
            if k != "step" and np.isfinite(float(v)):
                rows.setdefault(k, []).append((r["step"], float(np.float32(v))))
    shown = {k: sorted(v) for k, v in read_tensorboard(run_dir).items()}
    return shown, {k: sorted(v) for k, v in rows.items()}


@pytest.mark.parametrize("enabled", [False, True])
def test_tensorboard_of_a_run_computed_again_from_step_0_shows_every_row_once(tmp_path, enabled):
    """A run whose first command stopped before a checkpoint it could resume from (``checkpoint.enabled=False``,
    or killed before its first checkpoint: here its checkpoints are removed) computes again from step 0; the event
    files of the first command stayed, and TensorBoard showed their rows beside the new ones (12 points of the 9
    rows of ``loss``)."""
    import shutil

    s = tiny_settings(30, **{"checkpoint.every": 10, "logging.tensorboard": True, "checkpoint.enabled": enabled})
    d = tmp_path / "r"
    run(s, str(d), max_chunks=1)
    if enabled:
        shutil.rmtree(d / "checkpoints")
    res = run(s, str(d))
    assert res.resumed_from == 0 and len(res.trajectory["loss"]) == 30
    shown, rows = _tensorboard_points(d)
    assert len(rows["loss"]) == 9
    assert shown == rows


def test_tensorboard_of_a_sweep_computed_again_from_step_0_shows_every_row_once(tmp_path):
    """The same for a sweep's members: a sweep with ``checkpoint.enabled=False`` stopped after two chunks, then run
    again from step 0 (15 points of the 9 rows of ``loss`` before)."""
    s = tiny_settings(30, **{"checkpoint.every": 10, "logging.tensorboard": True, "checkpoint.enabled": False,
                             "sweep.lr": (0.02, 0.05), "sweep.seed": (0,)})
    d = tmp_path / "sw"
    sweep(s, str(d), max_chunks=2, devices=jax.devices()[:2])
    res = sweep(s, str(d), devices=jax.devices()[:2])
    for m in res.member_dirs:
        shown, rows = _tensorboard_points(m)
        assert len(rows["loss"]) == 9
        assert shown == rows


@pytest.mark.parametrize("arg, key, meant", [("--config.optim.LR=0.1", "optim.LR", "lr"),
                                             ("--config.STEPS=3", "STEPS", "steps")])
def test_an_unknown_key_in_other_capitals_is_pointed_to_its_spelling(tmp_path, capsys, arg, key, meant):
    """``--config.optim.LR=0.1`` was refused with the allowed keys and no suggestion (difflib finds no close match
    for a key spelt in capitals, while a misspelt choice such as ``optim.name='SGD'`` got one); nothing is
    written."""
    wd = tmp_path / "r"
    assert main(["quotient-sgd", "run", f"--config={TINY}", arg, f"--workdir={wd}"]) == 2
    err = capsys.readouterr().err
    assert f"config.{key}" in err and f"did you mean {meant!r}?" in err and "Traceback" not in err, err
    assert not wd.exists()


def test_an_unknown_key_in_other_capitals_set_in_a_config_is_pointed_to_its_spelling():
    """The same for a key set in a config file's ``get_config()`` (validated as a whole)."""
    c = default_config()
    c.optim.LR = 0.1
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        validate(c)
    c = default_config()
    c.Seed = 1
    with pytest.raises(ConfigError, match="did you mean 'seed'"):
        validate(c)


@pytest.mark.parametrize("args", [[], [f"--config={TINY}", "--config.steps=5"]])
def test_the_command_without_a_subcommand_says_so_and_writes_nothing(tmp_path, monkeypatch, capsys, args):
    """``quotient-sgd`` alone (typed to see what it does) trained the default config for 600 steps into
    ``runs/quickstart`` of the current directory, and ``quotient-sgd --config=X.py`` ran X: nothing in the usage or
    the README says the subcommand may be left out.  Now: exit status 2, the usage, nothing written."""
    monkeypatch.chdir(tmp_path)
    assert main(["quotient-sgd", *args]) == 2
    err = capsys.readouterr().err
    assert "no subcommand" in err and "quotient-sgd run" in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("body, status", [
    ("import sys\n\n\ndef get_config():\n    sys.exit(0)\n", "SystemExit(0)"),
    # a script turned into a config: its parser requires an option the command line does not hold (whatever the
    # process's own arguments are: the test runner's, or its worker's)
    ("import argparse\n\n\ndef get_config():\n    p = argparse.ArgumentParser(); "
     "p.add_argument('--data', required=True); p.parse_args()\n", "SystemExit(2)"),
])
def test_a_config_file_that_ends_the_program_is_named(tmp_path, capsys, body, status):
    """A config file whose ``get_config()`` calls ``sys.exit(0)`` ended the command with status 0, nothing done
    and nothing said; one that parses the command line with argparse (a script turned into a config) ended it
    with argparse's own usage, naming neither the file nor the line.  Now: exit status 2 naming both."""
    cfg = tmp_path / "exits.py"
    cfg.write_text(body)
    wd = tmp_path / "r"
    assert main(["quotient-sgd", "run", f"--config={cfg}", f"--workdir={wd}"]) == 2
    err = capsys.readouterr().err
    assert f"config file {str(cfg)!r}, line 5" in err and status in err and "Traceback" not in err, err
    assert not wd.exists()


@pytest.mark.parametrize("cmd", ["run", "sweep", "report"])
@pytest.mark.parametrize("target, needle", [("file/", "is a file|exists and is not a directory"),
                                            ("dangling", "is a symbolic link to")])
def test_a_workdir_that_is_a_file_with_a_slash_or_a_link_to_nothing_is_named(tmp_path, monkeypatch, capsys, cmd,
                                                                              target, needle):
    """``--workdir=out.txt/`` (a file, with the slash a shell's completion adds) and a symbolic link to a directory
    that does not exist were refused as "cannot be created: File exists" (``report``: "does not exist"); now
    the message says what the path is.  Exit status 2, nothing written."""
    import re

    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "gone" / "dir", tmp_path / "dangling")
    args = [target] if cmd == "report" else [f"--config={TINY}", f"--workdir={target}"]
    assert main(["quotient-sgd", cmd, *args]) == 2
    err = capsys.readouterr().err
    assert re.search(needle, err) and "File exists" not in err and f"{target!r} does not exist" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["dangling", "file"]


def test_the_sweep_loss_plot_keeps_the_scale_of_the_members_that_did_not_diverge(tmp_path, monkeypatch):
    """A diverging member's losses before its first non-finite one (~1e15 here, ~1e20 at lr=0.9) set the log axis of
    ``plots/loss.png``: the other member's curve was drawn into 1 of its 18 decades (3 of 24 at lr=0.9).  Now the
    axis keeps that curve whole and gives it at least a third of its decades, and the diverged member's label says
    where it diverged."""
    import matplotlib.figure

    from quotient_sgd.runner import report

    s = tiny_settings(20, **{"checkpoint.every": 10, "sweep.lr": (0.05, 2.0), "sweep.seed": (0,)})
    res = sweep(s, str(tmp_path / "sw"), devices=jax.devices()[:2])
    assert list(res.diverged) == [1]
    drawn = {}
    save = matplotlib.figure.Figure.savefig

    def record(fig, path, *a, **kw):
        ax = fig.axes[0]
        drawn[os.path.basename(path)] = (ax.get_ylim(), [(ln.get_label(), np.asarray(ln.get_ydata(), float))
                                                         for ln in ax.lines])
        return save(fig, path, *a, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    report(str(tmp_path / "sw"))
    (lo, hi), lines = drawn["loss.png"]
    ok = [y for label, y in lines if "lr=0.05" in label]
    assert len(ok) == 1
    y = ok[0][np.isfinite(ok[0])]
    assert lo <= y.min() and y.max() <= hi
    assert np.log10(y.max() / y.min()) >= np.log10(hi / lo) / 3, (lo, hi, y.min(), y.max())
    diverged = [label for label, _ in lines if "lr=2.0" in label]
    assert diverged[0].endswith(f"(diverged at step {res.diverged[1]['step']})")
