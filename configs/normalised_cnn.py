"""Experiment 4 (experiments/normalised_cnn.py): a CNN with LayerNorm after every conv on scikit-learn's digits,
SGD with weight decay; the scale-invariant conv blocks reach the angular-update equilibrium sqrt(2 eta lambda)."""

import ml_collections


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.scale = scale
    c.seed = 0
    c.channels = (8, 16)
    c.norm = "layer"
    c.lr = 0.1
    c.weight_decay = 0.01  # equilibrium time scale ~ 1 / (2 lr wd) = 500 steps
    c.batch_size = 128
    c.num_steps = 3000
    c.spike_smooth = 20  # mini-batch losses: spikes are tested on a 20-step causal running mean
    c.tail_fraction = 0.25  # equilibrium measured over the last quarter of the run
    if scale == "paper":
        c.channels = (32, 64, 64)
        c.weight_decay = 5e-4
        c.num_steps = 60000
    elif scale == "test":
        c.num_steps = 1500
    return c
