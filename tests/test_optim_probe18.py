"""quotient_trajectory on cases the other tests do not use: the raw Hessian evaluated beside the projected points."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from quotient_sgd.optim import quotient_trajectory, train
from test_optim_trajectory import init_mlp, mlp_group


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
