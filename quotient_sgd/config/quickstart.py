"""The default config (``quotient-sgd run`` with no ``--config``): a small ReLU MLP on scikit-learn's digits.

SGD with momentum, every default quotient observable every 10 steps, Hessian extremes every 100 steps; finishes in
well under a minute on 2 CPU cores.  ``configs/quickstart.py`` loads this file.
"""

from quotient_sgd.config import default_config


def get_config():
    config = default_config()
    config.name = "quickstart"
    config.steps = 600
    config.seed = 0
    config.model.name = "mlp"
    config.model.hidden = (32,)
    config.model.activation = "relu"
    config.data.name = "digits"
    config.data.batch_size = 64
    config.optim.name = "sgd"
    config.optim.lr = 0.1
    config.optim.momentum = 0.9
    config.observables.every = 10  # quotient observables refreshed every 10 steps (they cost ~10x a step)
    config.observables.hessian_every = 100
    config.logging.every = 10
    config.checkpoint.every = 100
    config.sweep.lr = (0.03, 0.1, 0.3, 1.0)
    config.sweep.seed = (0, 1)
    return config
