"""Grokking: a one-layer Transformer on modular addition (a + b mod p), full-batch AdamW with weight decay
(Power et al. 2022; Nanda et al. 2023 use p = 113, weight decay 1).

Two consumers share this file:

- ``get_config()`` (no argument): the runner config (schema of :mod:`quotient_sgd.config`) for
  ``quotient-sgd run --config=configs/grokking.py`` (written by the runner developer);
- ``get_config("cpu" | "test" | "paper")``: the config of experiment 3, ``experiments/grokking.py``.
"""

import ml_collections


def _runner_config():
    from quotient_sgd.config import default_config

    config = default_config()
    config.name = "grokking"
    config.steps = 3000
    config.model.name = "transformer"
    config.model.d_model = 32
    config.model.num_heads = 2
    config.model.num_layers = 1
    config.data.name = "modular_arithmetic"
    config.data.p = 23
    config.data.train_fraction = 0.4
    config.data.batch_size = 0  # full batch
    config.optim.name = "adamw"
    config.optim.lr = 1e-3
    config.optim.b2 = 0.98
    config.optim.weight_decay = 1.0
    config.observables.every = 10
    config.observables.hessian_every = 250
    config.logging.every = 10
    config.checkpoint.every = 250
    config.sweep.weight_decay = (0.1, 0.3, 1.0)
    config.sweep.seed = (0, 1)
    return config


def get_config(scale: str | None = None) -> ml_collections.ConfigDict:
    if scale is None:
        return _runner_config()
    c = ml_collections.ConfigDict()
    c.scale = scale
    c.seed = 0
    c.p = 23
    c.train_fraction = 0.5
    c.d_model = 64
    c.num_heads = 4
    c.num_layers = 1
    c.lr = 1e-3
    c.b1 = 0.9
    c.b2 = 0.98
    c.weight_decay = 1.0
    c.num_steps = 5000
    c.eval_every = 50  # quotient observables and test accuracy are evaluated every eval_every steps
    c.alpha = 0.05  # change-point false-alarm rate over the run (Bonferroni over the monitored observables)
    if scale == "paper":
        c.p = 113
        c.train_fraction = 0.3
        c.d_model = 128
        c.num_steps = 40000
        c.eval_every = 100
    elif scale == "test":
        c.lr = 3e-3
        c.num_steps = 1800
        c.eval_every = 50
    return c
