"""Grokking: a one-layer Transformer on a + b mod 23 with AdamW and strong weight decay (Power et al., 2022)."""

from quotient_sgd.config import default_config


def get_config():
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
