"""Experiment 2 (experiments/catapult.py): a wide two-layer ReLU network trained by full-batch GD at
lr = eta_lambda0 / lambda0 with eta_lambda0 between 2 and 4 (Lewkowycz et al. 2020)."""

import ml_collections


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.scale = scale
    c.seed = 0
    c.num_examples = 64
    c.input_dim = 8
    c.teacher_hidden = 16
    c.teacher_gain = 2.0
    c.width = 512
    c.eta_lambda0 = 3.0  # in (2, 4): catapult; < 2: lazy; > 4: divergence
    c.num_steps = 200
    c.hessian_every = 5
    c.lanczos = 20
    # detector settings (stated in experiments/README.md)
    c.spike_factor = 2.0
    c.drop_factor = 0.8
    if scale == "paper":
        c.num_examples = 512
        c.input_dim = 32
        c.width = 4096
        c.num_steps = 2000
        c.hessian_every = 10
        c.lanczos = 40
    elif scale == "test":
        c.width = 256
        c.num_steps = 80
        c.hessian_every = 8
        c.lanczos = 15
    return c
