"""Experiment 3 (experiments/grokking.py): a one-layer Transformer on modular addition (a + b mod p), full-batch
AdamW with weight decay (Power et al. 2022; Nanda et al. 2023 use p = 113, weight decay 1)."""

import ml_collections


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
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
