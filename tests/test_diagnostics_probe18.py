"""A run whose batch is the whole training set is judged for loss spikes as a full-batch run."""

import numpy as np

from quotient_sgd.diagnostics import detect
from quotient_sgd.diagnostics._live import _options_from_config


def _spike_steps(cfg):
    loss = np.ones(80)
    loss[40] = 3.0  # one step at 3 x the minimum: a spike of the raw loss, 1.1 x on a 20-step mean
    opts = _options_from_config(cfg)
    return [e.step for e in detect({"loss": loss}, kinds=["loss_spike"], **opts)], opts.get("spike_smooth")


def test_a_batch_of_the_whole_training_set_is_not_smoothed_as_a_mini_batch():
    """The runner draws distinct examples, so ``data.batch_size`` equal to the training set's size takes
    gradient-descent steps, as ``batch_size = 0`` (the noise check already treats it so); the detector settings of
    such a run smoothed its loss over 20 steps as a mini-batch loss's, and a one-step spike went unreported."""
    ts = {"name": "teacher_student", "n_train": 96}
    full = _spike_steps({"data": {**ts, "batch_size": 0}})
    assert full == ([40], 1)
    assert _spike_steps({"data": {**ts, "batch_size": 96}}) == full
    assert _spike_steps({"data": {**ts, "batch_size": 95}}) == ([], 20)  # a mini-batch: the 20-step mean
    # digits: the training set is what remains after data.test_fraction (1797 images)
    n_test = int(round(0.25 * 1797))
    assert _spike_steps({"data": {"name": "digits", "batch_size": 1797 - n_test}}) == full
    assert _spike_steps({"data": {"name": "digits", "batch_size": 64}})[1] == 20
    # a section the config module does not know keeps the mini-batch reading
    assert _spike_steps({"data": {"name": "mine", "batch_size": 10**6}})[1] == 20
