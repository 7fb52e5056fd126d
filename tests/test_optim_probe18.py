"""quotient_trajectory on cases the other tests do not use: the raw Hessian evaluated beside the projected points."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from quotient_sgd.optim import quotient_trajectory, train
from test_optim_trajectory import data, init_mlp, mlp_group, xent


def test_raw_hessian_beside_other_points_resolves_a_small_bulk(x64):
    """The raw Hessian's Lanczos run in one lax.map with the horizontal one must keep the whole space's breakdown
    threshold: a quadratic loss with a top of 1e3 and a bulk in [1e-9, 4e-8] (float64) has lambda_min 1e-9, which
    ``hessian_at=("raw",)`` alone resolves, but beside ``"horizontal"`` (and so with the default hessian_at) the
    bulk was taken for a breakdown and lambda_min_raw came out as 1.05e-8, ten times too large."""
    params = init_mlp(jax.random.key(0), (2, 3, 2), dtype=jnp.float64)
    flat, _ = ravel_pytree(params)
    n = flat.size
    eigs = np.concatenate([[1e3, 5e2], np.linspace(1e-9, 4e-8, n - 2)])
    basis, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(n, n)))
    a = jnp.asarray(basis @ np.diag(eigs) @ basis.T)

    def loss(p, batch):
        f = ravel_pytree(p)[0]
        return 0.5 * f @ a @ f + jnp.sum(batch)

    tx = quotient_trajectory(optax.sgd(0.0), mlp_group(n_layers=2), observables=(), hessian_every=1,
                             hessian_at=("horizontal", "raw"), lanczos_steps=n)
    _, _, traj = train(loss, params, tx, jnp.zeros((1, 1)), donate=False)
    np.testing.assert_allclose(float(traj["sharpness_raw"][0]), eigs.max(), rtol=1e-10)
    np.testing.assert_allclose(float(traj["lambda_min_raw"][0]), eigs.min(), rtol=1e-3)


def _loss_and_state(params, state, batch):
    return xent(params, batch), (None, state)


def test_model_state_follows_only_the_regaugings_that_ran_inside_multisteps():
    """gauge_fix inside optax.MultiSteps(k=3) re-gauges the parameters at the applied steps only (2 of 6); its state,
    kept as it was while MultiSteps accumulates, still held the last step's element and applied flag, so train moved
    the model state by it again at every accumulating step (4 moves in 6 steps).  Counted with an action that adds 1
    to the model state."""
    from quotient_sgd.optim import gauge_fix

    params = init_mlp(jax.random.key(0))
    count = lambda element, s: s + 1  # noqa: E731
    tx = optax.MultiSteps(gauge_fix(optax.sgd(0.1), mlp_group()), 3)
    with jax.numpy_dtype_promotion("standard"):  # (MultiSteps' mean of the accumulated gradients)
        _, _, state, _ = train(_loss_and_state, params, tx, data(6), model_state=jnp.zeros((), jnp.int32),
                               act_on_model_state=count, donate=False)
    assert int(state) == 2  # one re-gauging per applied step
