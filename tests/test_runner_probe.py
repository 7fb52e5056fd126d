"""The CLI and runner on the cases a researcher meets around a run: run directories that cannot be written,
re-runs of finished runs, reports of sweeps, malformed config files and launch flags."""

import os

import pytest

from quotient_sgd.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _cli(*args):
    return main(["quotient-sgd", *args])


@pytest.mark.parametrize("cmd", ["run", "sweep"])
@pytest.mark.parametrize("existing", [False, True])
def test_workdir_without_write_permission_is_refused_before_any_compute(tmp_path, monkeypatch, capsys, cmd,
                                                                        existing):
    """A --workdir (or the parent it would be created in) that this process may not write into: a clear error
    naming it, status 2, nothing written (it was an OSError traceback after the model and data were built)."""
    import quotient_sgd.runner._rundir as rundir

    monkeypatch.chdir(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    wd = locked / "r" if not existing else locked
    real_access = os.access
    monkeypatch.setattr(rundir.os, "access", lambda p, mode: False if os.fspath(p) == str(locked)
                        else real_access(p, mode))
    code = _cli(cmd, f"--config={TINY}", "--config.steps=10", f"--workdir={wd}")
    err = capsys.readouterr().err
    assert code == 2, err
    assert repr(str(wd)) in err and "not writable" in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == ["locked"] and os.listdir(locked) == []


@pytest.mark.parametrize("cmd", ["run", "sweep"])
def test_workdir_that_cannot_be_created_is_named(tmp_path, monkeypatch, capsys, cmd):
    """A --workdir whose creation fails (here a name longer than file systems allow; a read-only file system is the
    same): a clear error with the reason, no traceback, and no parent directory left behind."""
    monkeypatch.chdir(tmp_path)
    wd = tmp_path / "runs" / ("x" * 300)
    code = _cli(cmd, f"--config={TINY}", "--config.steps=10", "--config.sweep.seed=()", f"--workdir={wd}")
    err = capsys.readouterr().err
    assert code == 2, err
    assert "cannot be created" in err and "name too long" in err.lower() and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []


def _table(text):
    return [line for line in text.splitlines() if line.startswith("|")]


def test_sweep_table_of_a_sweep_without_axes_is_well_formed(tmp_path):
    """A sweep with no axis (one member: the config itself): every line of its summary table has as many cells
    as the header (the header had an empty column for the missing axes).  Reported before any member has a
    trajectory, its loss plot has no legend (matplotlib warned about an empty one)."""
    import json
    import warnings

    from quotient_sgd.config import load_config, validate
    from quotient_sgd.runner import report

    s = validate(load_config(TINY, {"sweep.seed": (), "sweep.lr": ()}))
    d = tmp_path / "sw"
    d.mkdir()
    (d / "sweep.json").write_text(json.dumps({"config": s.to_dict(), "members": [{}], "num_devices": 1,
                                              "num_processes": 1, "members_per_device": 1}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = report(str(d))
        table = _table(summary)
    assert not [w for w in caught if "legend" in str(w.message)]  # no curve to label yet: no empty legend
    assert "- 1 member (" in summary  # (not "1 members")
    assert len(table) == 3 and table[0].startswith("| member | eval step | train loss |"), table
    assert len({line.count("|") for line in table}) == 1, table


def test_running_a_diverged_run_again_computes_nothing_and_keeps_its_record(tmp_path):
    """A run that diverged has ended, like a finished one: the same command again leaves its trajectory, metric rows
    and record (wall time, 'resumed from') as they were (the diverging chunk was recomputed from the checkpoint
    before it, and the run recorded as 'resumed from step 6')."""
    import json

    from quotient_sgd.config import load_config, validate
    from quotient_sgd.runner import run

    s = validate(load_config(TINY, {"steps": 20, "optim.lr": 2.0, "checkpoint.every": 2, "logging.every": 1,
                                    "observables.names": ("loss",), "logging.plots": False}))
    wd = str(tmp_path / "r")
    first = run(s, wd)
    assert first.diverged is not None and first.diverged["step"] >= 4  # after a checkpoint (every 2 steps)
    files = ("run.json", "metrics.jsonl", "events.json", "trajectory.npz")
    before = {f: open(os.path.join(wd, f), "rb").read() for f in files}
    again = run(s, wd)
    assert again.diverged == first.diverged and again.steps_done == first.steps_done
    assert {f: open(os.path.join(wd, f), "rb").read() for f in files} == before
    assert json.loads(before["run.json"])["resumed_from"] == 0
    assert "resumed from" not in open(os.path.join(wd, "summary.md")).read()


def test_sweep_whose_members_all_diverged_computes_nothing_when_run_again(tmp_path):
    """A sweep ends when every member has diverged; the same command again computes nothing and keeps its
    checkpoints and recorded wall time (it ran the remaining chunks for no member, checkpointing each, and recorded
    the new call's wall time)."""
    import json

    import jax

    from helpers import checkpoint_steps
    from quotient_sgd.config import load_config, validate
    from quotient_sgd.runner import sweep

    # (the programs of the diverging run above: compiled once)
    s = validate(load_config(TINY, {"steps": 20, "checkpoint.every": 2, "sweep.seed": (), "sweep.lr": (2.0, 3.0),
                                    "logging.every": 1, "observables.names": ("loss",), "logging.plots": False}))
    wd = str(tmp_path / "sw")
    first = sweep(s, wd, members_per_device=1, devices=jax.devices()[:1], plots=False)
    assert sorted(first.diverged) == [0, 1] and first.steps_done < 20
    ckpts, wall = checkpoint_steps(wd), json.load(open(os.path.join(wd, "sweep.json")))["wall_s"]
    again = sweep(s, wd, members_per_device=1, devices=jax.devices()[:1], plots=False)
    assert again.diverged == first.diverged and again.steps_done == first.steps_done
    assert checkpoint_steps(wd) == ckpts
    assert json.load(open(os.path.join(wd, "sweep.json")))["wall_s"] == wall
