"""Statements of README.md checked against the code (one test per statement found wrong)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from quotient_sgd.diagnostics import shock_aware_lr
from quotient_sgd.optim import train


def test_shock_aware_lr_trains_with_donated_state():
    """README: `tx = shock_aware_lr(optax.adamw(1e-3), ...)` is an optimiser for `train`, which donates the
    optimiser state by default.  Its init returned one zero array for three scalar fields and one zero tree for
    both the previous gradients and updates, so `train` failed with "Attempt to donate the same buffer twice".
    Every leaf of the state is now its own buffer, and a donated run equals a kept one."""
    w_true = jnp.array([1.0, -2.0, 0.5])
    x = jax.random.normal(jax.random.key(0), (32, 3))
    y = x @ w_true

    def loss_fn(p, batch):
        xb, yb = batch
        return jnp.mean((xb @ p["w"] - yb) ** 2)

    batch_fn = lambda step, key: (x, y)
    tx = shock_aware_lr(optax.sgd(0.05, momentum=0.9), fold_target=1.8, policy="cap")  # adam: strict promotion
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    leaves = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
    assert len({id(x) for x in leaves}) == len(leaves)
    kept_p, _, _ = train(loss_fn, params, tx, batch_fn, num_steps=5, donate=False)
    p, _, _ = train(loss_fn, {"w": jnp.zeros(3)}, tx, batch_fn, num_steps=5)
    np.testing.assert_array_equal(np.asarray(p["w"]), np.asarray(kept_p["w"]))
    assert float(loss_fn(p, (x, y))) < float(loss_fn({"w": jnp.zeros(3)}, (x, y)))
