"""Run directories, Adam's preconditioned sharpness and the compiled group methods, beyond their own tests."""

import os
import shutil

import jax
import numpy as np

from helpers import tiny_settings
from quotient_sgd.runner import load_trajectory, sweep


def test_load_trajectory_of_a_killed_sweep_member_counts_the_sweeps_checkpoints(tmp_path):
    """A sweep member has no checkpoints of its own: a resume restarts from the sweep's
    (``<sweep>/checkpoints``) and drops the member's parts from there on.  ``source`` said every part lay after
    ``step 0 (no checkpoint)``; it names the sweep's newest checkpoint and the parts after it."""
    s = tiny_settings(30, **{"sweep.seed": (), "sweep.lr": (0.02, 0.05)})
    wd = str(tmp_path / "sw")
    sweep(s, wd, members_per_device=1, devices=jax.devices()[:1], max_chunks=2)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["10", "20"]
    shutil.rmtree(os.path.join(wd, "checkpoints", "20"))  # a kill after the parts of [10, 20), before its checkpoint
    member = os.path.join(wd, "members", "001")
    assert not os.path.exists(os.path.join(member, "trajectory.npz"))
    traj = load_trajectory(member)
    assert traj.source.startswith("trajectory_parts/ (2 part(s), steps 0 to 19"), traj.source
    assert "1 part(s) from step 10 on are after the sweep's newest checkpoint (step 10)" in traj.source, traj.source
    assert np.array_equal(traj["step"], np.arange(20))
