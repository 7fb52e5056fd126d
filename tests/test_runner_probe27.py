"""A sweep given one device that is not the default one computes there."""

import os

import jax
import numpy as np

import quotient_sgd.runner._sweep as sweep_module
from quotient_sgd.config import load_config, validate
from quotient_sgd.runner import sweep

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")


def test_sweep_on_one_non_default_device_computes_on_it(tmp_path, monkeypatch):
    # sweep(devices=[jax.devices()[1]]) with one member per device runs the unbatched program of a run; its state,
    # inputs and data went to the default device, so every program was compiled for and ran on device 0
    device = jax.devices()[1]
    placed = []

    def spy(lowered, original=sweep_module.compile_seconds):
        compiled, seconds = original(lowered)
        placed.append({d for sh in jax.tree.leaves(compiled.input_shardings) for d in sh.device_set})
        return compiled, seconds

    monkeypatch.setattr(sweep_module, "compile_seconds", spy)
    s = validate(load_config(TINY, {"steps": 3, "checkpoint.every": 3, "logging.plots": False,
                                                 "sweep.lr": (0.05,), "sweep.seed": ()}))
    res = sweep(s, str(tmp_path / "sw"), devices=[device])
    assert placed and all(p == {device} for p in placed), placed
    traj = np.load(tmp_path / "sw" / "members" / "000" / "trajectory.npz")
    assert res.num_members == 1 and traj["loss"].shape == (3,) and np.isfinite(traj["loss"]).all()
