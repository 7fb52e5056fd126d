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
