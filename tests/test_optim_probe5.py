"""quotient_sgd.optim on further optimisers and inputs: SGD specs for optimisers whose state shows that they are
not SGD (Adafactor, noisy SGD, optimistic gradient descent, optax.contrib's adaptive methods)."""

import jax
import optax
import optax.contrib
import pytest

from quotient_sgd.optim import SGDSpec, quotient_trajectory
from test_optim_trajectory import init_mlp, mlp_group

CHARGES = ("charge_drift", "charge_drift_predicted")

NOT_SGD = {
    "adafactor": lambda: optax.adafactor(1e-2),
    "noisy_sgd": lambda: optax.noisy_sgd(0.1, key=jax.random.key(0)),
    "optimistic": lambda: optax.optimistic_gradient_descent(0.1),
    "prodigy": lambda: optax.contrib.prodigy(0.1),
    "dog": lambda: optax.contrib.dog(0.1),
    "sophia": lambda: optax.contrib.sophia(1e-2),
    "schedule_free_sgd": lambda: optax.contrib.schedule_free_sgd(0.1),
    "mechanize": lambda: optax.contrib.mechanize(optax.sgd(0.1)),
    "momo": lambda: optax.contrib.momo(0.1),
}


@pytest.mark.parametrize("name", list(NOT_SGD))
def test_an_sgd_spec_for_other_non_sgd_optimisers_is_refused(name):
    """An SGDSpec given for Adafactor, noisy SGD, optimistic gradient descent or an optax.contrib adaptive optimiser
    was accepted, and its prediction reported as the SGD identity of a step the optimiser does not take (float64,
    6 steps of the test MLP: 100-103% off for adafactor, noisy_sgd, optimistic, prodigy, sophia; 55-92% for
    schedule_free_sgd, mechanize, momo; 3% for dog).  Now refused at init, naming the state."""
    params = init_mlp(jax.random.key(0))
    tx = quotient_trajectory(NOT_SGD[name](), mlp_group(), spec=SGDSpec(0.1), observables=CHARGES)
    with pytest.raises(ValueError, match=r"SGDSpec.*holds \['\w+State'.*spec=None"):
        tx.init(params)
