"""Experiment 6 (experiments/shock_lr.py): shock-aware learning rate versus constant and cosine schedules at
equal step budget, on the catapult setting of configs/catapult.py (and the edge-of-stability setting)."""

import importlib.util
import os

import ml_collections


def _catapult():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "catapult.py")
    spec = importlib.util.spec_from_file_location("qsgd_configs_catapult", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.scale = scale
    c.problem = _catapult().get_config(scale)
    c.eta_lambda0 = 3.0  # base lr = eta_lambda0 / lambda0 for every schedule
    c.num_steps = 300 if scale != "paper" else 3000
    c.fold_target = 1.8  # policy "cap": keep the live fold number lr*kappa below this
    c.track_target = 1.8  # policy "track": hold it there (steps may lengthen up to max_scale)
    c.max_scale = 4.0
    c.init_scale = 0.3  # first step (no curvature measured yet) at 0.3 x the base lr
    c.spike_factor = 2.0
    c.seeds = (0, 1, 2)
    if scale == "test":
        c.num_steps = 80
        c.seeds = (0,)
    return c
