"""A small CNN with BatchNorm on scikit-learn's digits: ``configs/digits_cnn.py`` with BatchNorm in place of
LayerNorm.  The running statistics are threaded through training as model state, checkpointed with the
parameters, and used for evaluation; per-channel scale symmetries of the normalised convolutions."""

import os

from quotient_sgd.config import load_config


def get_config():
    config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_cnn.py"))
    config.name = "digits_bn_cnn"
    config.model.norm = "batch"
    return config
