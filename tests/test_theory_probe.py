"""THEORY conformance: the library's formulas against independent float64 implementations on random small cases
(random seeds, random group elements, several sizes), and their composition with jax.grad / jax.jvp."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from quotient_sgd import models
from quotient_sgd import observables as qobs


def _moved(model, seed):
    """``(group, g . params)``: the model's float64 parameters moved by a random element of its group."""
    _, params = nnx.split(model, nnx.Param)
    group = model.symmetries()
    return group, group.act(group.sample(jax.random.key(seed), params), params)


def _dense_horizontal(group, params):
    """``I - T^T (T T^T)^+ T`` from the orbit tangents ``T`` (THEORY section 1), dense, in ravelled coordinates."""
    t = np.asarray(jax.vmap(lambda x: ravel_pytree(x)[0])(group.tangents(params)))
    return np.eye(t.shape[1]) - t.T @ np.linalg.pinv(t @ t.T, rcond=1e-12) @ t


@pytest.mark.parametrize("case", ["rescale_mlp", "gl_wide_linear"])
def test_frozen_horizontal_is_differentiable_in_the_parameters(x64, case):
    """The horizontal projection at theta (``frozen_horizontal``, the projection of the ``"unrolled"`` Lanczos runs)
    is a smooth function of theta where the orbit's dimension is locally constant: its jvp in the parameters matches
    central differences of the dense projector ``I - T^T (T T^T)^+ T``.  (It was NaN in 18 of 20 entries for a
    rescale MLP: the second Gram pass decomposed a matrix ~ I, whose repeated eigenvalues have no eigh derivative;
    the SVD of the GL branch alike.)  The wide linear chain has dependent generators (41 tangents of rank 36)."""
    if case == "rescale_mlp":
        model = models.MLP(3, (3,), 2, param_dtype=jnp.float64, rngs=nnx.Rngs(3))
    else:
        model = models.DeepLinear(3, (4, 5), 2, param_dtype=jnp.float64, rngs=nnx.Rngs(2))
    group, params = _moved(model, 5)
    f0, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.key(3), f0.shape, jnp.float64)
    dp = jax.random.normal(jax.random.key(4), f0.shape, jnp.float64)

    def frozen(f):
        return ravel_pytree(qobs.frozen_horizontal(group, unravel(f))(unravel(v)))[0]

    value, tangent = jax.jit(lambda f, t: jax.jvp(frozen, (f,), (t,)))(f0, dp)  # (one program, not op by op)
    np.testing.assert_allclose(value, _dense_horizontal(group, params) @ np.asarray(v), atol=1e-10)
    h = 1e-5
    plus, minus = (_dense_horizontal(group, unravel(f0 + s * h * dp)) for s in (1, -1))
    central = (plus - minus) / (2 * h)
    assert np.all(np.isfinite(tangent))
    np.testing.assert_allclose(tangent, central @ np.asarray(v), atol=1e-6 * np.abs(central @ np.asarray(v)).max())


def test_unrolled_sharpness_penalty_gradient(x64):
    """``jax.grad`` of the quotient sharpness (a sharpness penalty) with ``method="unrolled"`` (the frozen
    projection) matches central differences along a random direction; it was NaN in every entry but the last
    layer's bias.  The quotient sharpness is an orbit invariant (THEORY section 4, kind 1), so its gradient is
    horizontal: orthogonal to every orbit tangent."""
    model = models.MLP(3, (3,), 2, param_dtype=jnp.float64, rngs=nnx.Rngs(3))
    graphdef, _ = nnx.split(model, nnx.Param)
    group, params = _moved(model, 2)
    x = jax.random.normal(jax.random.key(0), (12, 3), jnp.float64)
    y = jax.random.randint(jax.random.key(1), (12,), 0, 2)
    f0, unravel = ravel_pytree(params)

    def top(f):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, p)(x), y).mean()

        return qobs.sharpness_quotient(loss, group, unravel(f), key=jax.random.key(1), num_matvecs=4,
                                       method="unrolled").top[0]

    # one compiled program gives the gradient at f0 and the values for the central difference
    value_and_grad = jax.jit(jax.value_and_grad(top))
    grad = np.asarray(value_and_grad(f0)[1])
    assert np.all(np.isfinite(grad))
    d = np.asarray(jax.random.normal(jax.random.key(4), f0.shape, jnp.float64))
    h = 1e-5
    central = (value_and_grad(f0 + h * d)[0] - value_and_grad(f0 - h * d)[0]) / (2 * h)
    np.testing.assert_allclose(grad @ d, central, rtol=1e-6)
    tangents = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(group.tangents(params)))
    assert np.abs(tangents @ grad).max() < 1e-9 * np.abs(grad).max()
