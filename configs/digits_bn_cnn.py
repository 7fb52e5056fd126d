"""A small CNN with BatchNorm on scikit-learn's digits: the running statistics are threaded through training as
model state, checkpointed with the parameters, and used for evaluation; per-channel scale symmetries of the
normalised convolutions."""

from quotient_sgd.config import default_config


def get_config():
    config = default_config()
    config.name = "digits_bn_cnn"
    config.steps = 1000
    config.model.name = "cnn"
    config.model.channels = (8, 16)
    config.model.norm = "batch"
    config.data.name = "digits"
    config.data.batch_size = 64
    config.optim.lr = 0.05
    config.optim.momentum = 0.9
    config.optim.weight_decay = 5e-4
    config.observables.every = 10
    config.observables.hessian_every = 200
    config.checkpoint.every = 200
    config.sweep.lr = (0.02, 0.05, 0.1, 0.2)
    return config
