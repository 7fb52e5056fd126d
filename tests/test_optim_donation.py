"""train(..., donate=True) with optimiser states that hold one array in two places."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from quotient_sgd.optim import train


def _loss(p, batch):
    return jnp.sum((p["w"] - 2.0) ** 2) + p["b"] ** 2


def _params():
    return {"w": jnp.arange(3.0), "b": jnp.ones(())}


def _reusing(inner):
    """``inner`` whose state also holds the parameters themselves and one zero array twice."""

    def init(params):
        z = jnp.zeros(())
        return (inner.init(params), params, z, z)

    def update(updates, state, params=None):
        u, s = inner.update(updates, state[0], params)
        return u, (s, *state[1:])

    return optax.GradientTransformation(init, update)


def test_donated_train_accepts_states_that_repeat_an_array():
    """A state holding one array twice (optax.lbfgs's memories; a custom state holding the parameters and one zero
    twice) was refused by XLA ("Attempt to donate the same buffer twice"); the donated run now equals the kept one."""
    for tx in (optax.lbfgs(), _reusing(optax.sgd(0.1, momentum=0.9))):
        kept = train(_loss, _params(), tx, lambda s, k: None, num_steps=4, donate=False)
        params = _params()
        state = tx.init(params)
        donated = train(_loss, params, tx, lambda s, k: None, num_steps=4, opt_state=state)
        for a, b in zip(jax.tree.leaves(kept[:2]), jax.tree.leaves(donated[:2])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
