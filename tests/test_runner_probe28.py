"""Run and sweep directories placed inside the directories that another run or sweep manages are refused."""

import json
import os

import pytest

from quotient_sgd.cli import main
from quotient_sgd.runner import RunDirError, run, sweep
from quotient_sgd.runner._rundir import check_workdir
from tests.helpers import tiny_settings


def _fake_run(path, s):
    """A run directory as a run leaves it: its config.json and a plots/ directory with a plot."""
    os.makedirs(os.path.join(path, "plots"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(s.to_dict(), f)
    with open(os.path.join(path, "plots", "loss.png"), "wb") as f:
        f.write(b"png")


def test_workdir_inside_a_runs_managed_directories_is_refused(tmp_path):
    # `quotient-sgd run --workdir=r1/plots/x` trained a run there, and the next `quotient-sgd run` of r1 (the same
    # command again: finalize removes and redraws plots/) deleted it without a word; checkpoints/ and
    # trajectory_parts/ are pruned on resume, a sweep's members/ written by the sweep
    s = tiny_settings(steps=2)
    r1 = str(tmp_path / "r1")
    _fake_run(r1, s)
    for sub in ("plots/x", "checkpoints/x", "trajectory_parts/x", "tensorboard", "plots"):
        wd = os.path.join(r1, sub)
        with pytest.raises(RunDirError, match=r"is in .*the (\w+)/ directory of the run .*r1"):
            run(s, wd)
        with pytest.raises(RunDirError, match="sweep directory .* directory of the run"):
            sweep(s, os.path.join(wd, "sweep"))
        assert not os.path.exists(os.path.join(r1, sub, "config.json"))
    assert sorted(os.listdir(os.path.join(r1, "plots"))) == ["loss.png"]
    # through a symbolic link too
    os.symlink(os.path.join(r1, "plots"), str(tmp_path / "lnk"))
    with pytest.raises(RunDirError, match="plots/ directory of the run"):
        check_workdir(str(tmp_path / "lnk" / "y"), s)
    # a sweep's member directory, and deeper inside it
    sw = tmp_path / "sw"
    os.makedirs(sw / "members" / "000")
    (sw / "sweep.json").write_text(json.dumps({"config": s.to_dict(), "members": [{}]}))
    with pytest.raises(RunDirError, match="members/ directory of the sweep"):
        check_workdir(str(sw / "members" / "000" / "plots" / "z"), s)
    # a directory of another name beside the run's files, and a directory named plots/ of no run, are accepted
    assert check_workdir(os.path.join(r1, "inner"), s) is False
    assert check_workdir(str(tmp_path / "plots" / "x"), s) is False
    other = tmp_path / "project"  # (a config.json of another program is no run)
    os.makedirs(other / "plots")
    (other / "config.json").write_text('{"theme": "dark"}')
    assert check_workdir(str(other / "plots" / "x"), s) is False
    # the command says it, with status 2
    assert main(["quotient-sgd", "run", f"--workdir={os.path.join(r1, 'plots', 'x')}", "--config.steps=2"]) == 2
    assert not os.path.exists(os.path.join(r1, "plots", "x"))
