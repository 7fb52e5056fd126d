"""Experiment 1 (experiments/edge_of_stability.py): full-batch GD on a ReLU MLP at the edge of stability, and a
twin started from a randomly re-gauged copy of the same initial function."""

import ml_collections


def get_config(scale: str = "cpu") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.scale = scale
    c.seed = 0
    c.num_examples = 128  # teacher-student regression, inputs N(0, I)
    c.input_dim = 8
    c.teacher_hidden = 16  # tanh teacher
    c.teacher_gain = 2.0
    c.hidden = (32, 32)  # ReLU student
    c.eta_lambda0 = 1.4  # lr = eta_lambda0 / lambda_step(theta_0) of the balanced run
    c.twin_scale = 0.3  # log rescale factors ~ U(-2 s, 2 s) for the re-gauged twin
    c.num_steps = 400
    # the Hessian at every step: sampled every 10 steps, the edge of a run that crosses 2 within 10 steps (a
    # catapult) or hovers just below 2 at the samples is missed (the twins of seeds 1 and 4 in
    # experiments/README.md's "Across seeds"); at this size a step with its Lanczos costs about what ten without
    # do, which here is seconds (the script ~25 s instead of ~15-20 s)
    c.hessian_every = 1
    c.lanczos = 20
    if scale == "paper":
        c.num_examples = 1000
        c.input_dim = 32
        c.teacher_hidden = 64
        c.hidden = (256, 256)
        c.num_steps = 5000
        # odd: past the edge lr * lambda_step alternates from step to step (the period-two oscillation), and an even
        # interval puts every refresh on one phase; on the low one the edge is never seen (detect_edge_of_stability's
        # measurement: every 20 steps missed 6 of 17 edges, every 19 or 21 none of those 6)
        c.hessian_every = 21
        c.lanczos = 40
    elif scale == "test":
        c.num_steps = 150
    return c
