"""Config validation, the CLI and the runner on settings a run cannot measure as asked: the gradient-noise
temperature of batches that hold one example, or of a batch-size sweep's masked members."""

import os

import pytest

from quotient_sgd.config import ConfigError, load_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")

NOISE = {"observables.noise_every": 1, "observables.per_example_grads": True}


def _tiny(**overrides):
    return validate(load_config(TINY, overrides))


@pytest.mark.parametrize("over, key, value, fixed", [
    ({"data.batch_size": 1}, "observables.noise_every", "1", {"data.batch_size": 2}),
    ({"data.batch_size": 0, "data.n_train": 1}, "observables.noise_every", "1", {"data.n_train": 2}),
    ({"sweep.batch_size": (4, 16)}, "sweep.batch_size", "(4, 16)", {"sweep.batch_size": ()}),
])
def test_noise_temperature_that_cannot_be_measured_is_refused(over, key, value, fixed):
    """A batch of one example has no sample variance (the temperature was NaN at every step), and a batch-size
    sweep measured every member's temperature over the largest, padded batch (a member of batch 2 in a sweep over
    (2, 8) recorded the temperature of batch 8, ten times off its own run's): both are refused by validation,
    naming the key, the value and what is allowed."""
    with pytest.raises(ConfigError) as e:
        _tiny(**NOISE, **over)
    msg = str(e.value)
    assert msg.startswith(f"config.{key} = {value}:"), msg
    assert "observables.noise_every=0" in msg, msg
    _tiny(**NOISE, **over | fixed)  # (batches of two examples, no batch-size sweep: measured)
    _tiny(**over | {"observables.noise_every": 0})  # (the same batches without the temperature pass)
