"""quotient_sgd.optim on inputs beyond the main tests: optax's extra-arguments optimisers, schedules, models."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from quotient_sgd.optim import quotient_trajectory, train
from test_optim_trajectory import data, init_mlp, mlp_group, xent


def _line_search(**kw):
    """SGD scaled by optax's backtracking line search: it needs the extra arguments value, grad and value_fn, and
    refuses extra arguments that value_fn does not name (as optax.lbfgs's zoom line search does)."""
    return optax.chain(optax.sgd(1.0), optax.scale_by_backtracking_linesearch(max_backtracking_steps=8, **kw))


@pytest.mark.parametrize("name", ["line_search", pytest.param("lbfgs", marks=pytest.mark.slow)])
def test_train_runs_optax_line_searches(name):
    """optax's line searches (optax.lbfgs; SGD with scale_by_backtracking_linesearch) need the extra arguments
    grad and value_fn, and refuse extra arguments that value_fn does not name: train passed value and loss_fn
    only, and quotient_trajectory(optax.lbfgs()) failed ("missing 2 required keyword-only arguments: 'grad' and
    'value_fn'").  Now they run: on one batch repeated, the line search's sufficient decrease makes every step
    lower the loss, and the wrapper observes the steps."""
    group = mlp_group()
    params = init_mlp(jax.random.key(0))
    batches = jax.tree.map(lambda x: np.repeat(np.asarray(x[:1]), 4, axis=0), data(4))  # full batch: one objective
    inner = _line_search() if name == "line_search" else optax.lbfgs()
    tx = quotient_trajectory(inner, group, observables=("loss", "grad_norm"))
    _, _, traj = train(xent, params, tx, batches, donate=False)
    assert np.all(np.diff(traj["loss"]) < 0), traj["loss"]
    g0 = jax.jit(lambda p, b: optax.tree.norm(jax.grad(xent)(p, b)))(params, jax.tree.map(lambda x: x[0], batches))
    np.testing.assert_allclose(traj["grad_norm"][0], g0, rtol=1e-5)
