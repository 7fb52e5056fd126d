"""Runs, sweeps and the CLI on what a finished run directory may lose or be given: the ``trajectory_parts/`` of a
finished run or sweep member removed (it duplicates ``trajectory.npz``) before the same command is run again."""

import os
import shutil

import jax
import numpy as np

from helpers import load_trajectory, tiny_settings
from quotient_sgd.runner import report, run, sweep


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---- defect 1: a finished run run again rebuilt trajectory.npz from its parts ------------------------------------
def test_a_finished_run_run_again_keeps_its_trajectory_without_its_parts(tmp_path):
    """A finished run (or sweep member) run again computes nothing and "keeps" its outputs, but its
    ``trajectory.npz`` was deleted and assembled again from ``trajectory_parts/``: with the parts removed (they
    duplicate the finished trajectory) the 20-step trajectory became an empty file, the summary said "steps: 0 of
    20" and the sweep table "unfinished (0 of 20 steps)".  Now the file is kept as it is."""
    s = tiny_settings(10)
    wd = str(tmp_path / "run")
    run(s, wd)
    want = load_trajectory(wd)
    shutil.rmtree(os.path.join(wd, "trajectory_parts"))
    res = run(s, wd)
    assert res.steps_done == 10
    _same(load_trajectory(wd), want)
    assert "- steps: 10 of 10" in report(wd)

    sw = sweep(tiny_settings(10, **{"sweep.seed": (0, 1), "sweep.lr": (0.05,)}), str(tmp_path / "sw"),
               devices=jax.devices()[:1])
    wants = [load_trajectory(d) for d in sw.member_dirs]
    for d in sw.member_dirs:
        shutil.rmtree(os.path.join(d, "trajectory_parts"))
    again = sweep(tiny_settings(10, **{"sweep.seed": (0, 1), "sweep.lr": (0.05,)}), str(tmp_path / "sw"),
                  devices=jax.devices()[:1])
    for d, w in zip(again.member_dirs, wants):
        _same(load_trajectory(d), w)
    with open(os.path.join(sw.workdir, "summary.md")) as f:
        table = f.read()
    assert table.count("| ok |") == 2 and "unfinished" not in table, table

