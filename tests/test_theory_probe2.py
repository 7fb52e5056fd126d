"""THEORY conformance, second round: the formulas behind the recorded observables against independent float64
implementations written from THEORY's text, at unbalanced points of the orbit (random group elements), where a
quantity taken in the wrong frame (the canonical point's instead of the current point's) shows."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from quotient_sgd.optim import quotient_trajectory, train
from quotient_sgd.symmetry import Product, Rescale, Translation


def _mlp(seed, sizes=(3, 4, 3)):
    ks = jax.random.split(jax.random.key(seed), 2 * len(sizes))
    return {f"l{i}": {"kernel": jax.random.normal(ks[2 * i], (a, b), jnp.float64) / np.sqrt(a),
                      "bias": 0.1 * jax.random.normal(ks[2 * i + 1], (b,), jnp.float64)}
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}


def _apply(p, x):
    h = jax.nn.relu(x @ p["l0"]["kernel"] + p["l0"]["bias"][None])
    return h @ p["l1"]["kernel"] + p["l1"]["bias"][None]


def _group():
    return Product((Rescale(incoming=((("l0", "kernel"), 1), (("l0", "bias"), 0)), outgoing=((("l1", "kernel"), 0),),
                            name="r0"),
                    Translation(kernel=("l1", "kernel"), bias=("l1", "bias"), name="t")))


def _example_losses(p, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(_apply(p, x), y)


def _xent(p, batch):
    return jnp.mean(_example_losses(p, batch))


def _data(steps, b=6):
    return (jax.random.normal(jax.random.key(1), (steps, b, 3), jnp.float64),
            jax.random.randint(jax.random.key(2), (steps, b), 0, 3))


def test_step_numbers_and_temperature_without_spec_use_the_steps_own_rate(x64):
    """THEORY sections 3-4: the fold / shock numbers of a gradient step of size eta are ``eta max(0, +-kappa)``,
    ``eta max(0, +-lambda)`` for the horizontal Hessian at the current point, and the temperature is
    ``T = eta sigma^2 / (2 B)``.  Without an ``SGDSpec`` the trajectory took ``eta`` from ``effective_lr["global"]
    = -<g, Delta> / |g_c|^2``, the rate relative to the canonical gradient, while kappa, the horizontal Hessian and
    sigma^2 are measured at the current point: for plain SGD at an unbalanced point of the orbit every one of them
    was ``|g|^2 / |g_c|^2`` times THEORY's (fold number 9.56 for ``eta kappa = 0.34`` on a 3-4-2 MLP, a stable step
    read as far past the edge of stability).  Checked against eta (SGD's own) and an independent sigma^2."""
    eta, steps, b = 0.05, 3, 6
    group = _group()
    # a random point of the orbit, far from the balanced one (one compiled program, not op by op)
    params = jax.jit(lambda p: group.act(group.sample(jax.random.key(3), p, scale=1.5), p))(_mlp(0))
    tx = quotient_trajectory(optax.sgd(eta), group, observables=("curvature", "shock_number", "fold_number"),
                             hessian_every=1, hessian_at=("horizontal",), lanczos_steps=3, noise_every=1)
    batches = _data(steps, b)
    traj = train(_xent, params, tx, batches, example_loss_fn=_example_losses, donate=False)[2]
    kappa = np.asarray(traj["curvature"])
    assert np.max(np.abs(kappa)) > 1  # a step with curvature to measure
    np.testing.assert_allclose(traj["fold_number"], eta * np.maximum(kappa, 0), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(traj["shock_number"], eta * np.maximum(-kappa, 0), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(traj["fold_number_hessian"], eta * np.maximum(traj["sharpness_horizontal"], 0),
                               rtol=1e-10)
    # sigma^2 at the first point, from its definition: horizontal per-example gradients (they are horizontal by
    # invariance), their sample variance per horizontal dimension (P minus the group's 4 + 1 + 4 generators)
    x, y = batches[0][0], batches[1][0]
    flat = np.asarray(jax.jit(jax.vmap(lambda xi, yi: ravel_pytree(jax.grad(_xent)(params, (xi[None], yi[None])))[0]))(
        x, y))
    d_h = flat.shape[1] - 9
    sigma2 = np.sum((flat - flat.mean(0)) ** 2) / ((b - 1) * d_h)
    np.testing.assert_allclose(traj["noise_sigma2"][0], sigma2, rtol=1e-10)
    np.testing.assert_allclose(traj["temperature"], eta * np.asarray(traj["noise_sigma2"]) / (2 * b), rtol=1e-10)
    np.testing.assert_allclose(traj["viscosity"], np.asarray(traj["temperature"]) / 2, rtol=1e-12)
