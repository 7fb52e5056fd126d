"""Experiment 5 (experiments/hj_slices.py): the viscous HJ flow on 1-D loss slices of a network trained by GD
(the ReLU MLP of configs/edge_of_stability.py), along the most concave horizontal direction at the canonical
point; slice shock time versus the quotient-Hessian prediction t* = 1 / max(0, -lambda_min)."""

import ml_collections


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.scale = scale
    c.seed = 0
    c.checkpoints = (0, 25, 100, 300)  # GD steps at which slices are taken
    c.extents = (0.02, 0.1, 0.5)  # slice half-widths along the unit eigenvector
    c.n = 201  # grid points on the slice
    c.nu_rel = 1e-2  # viscosity nu = nu_rel * extent^2 / t (viscous length ~ 10% of the slice; reported per row)
    c.max_steps = 20000
    c.flow_time_factor = 2.0  # flow to t = factor x t*_hessian, after the predicted shock time
    c.lanczos = 30
    # key=value overrides of configs/edge_of_stability.py for the trained MLP and its data, applied to experiment 1's
    # config at this scale (none: its sizes at this scale), e.g. ("hidden=[8]", "num_examples=32")
    c.model = ()
    if scale == "paper":
        c.checkpoints = (0, 100, 500, 2000, 5000)
        c.n = 801
        c.lanczos = 60
    elif scale == "test":
        # the smoke test of tests/test_diagnostics_experiments.py: a smaller MLP, one wide slice at two
        # checkpoints, a coarse grid (end to end in seconds; its numbers are not the experiment's)
        c.checkpoints = (0, 10)
        c.extents = (0.5,)
        c.n = 41
        c.lanczos = 10
        c.max_steps = 2000
        c.model = ("hidden=[8]", "num_examples=32", "lanczos=10")
    return c
