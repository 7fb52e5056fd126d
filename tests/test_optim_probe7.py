"""quotient_sgd.optim / observables on further inputs: derivatives of Lanczos extremes past the dimension, bad
arguments of lanczos_extremes, SGDSpec schedules, train's key / start_step / model_state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.observables import lanczos_extremes


def _symmetric(n, seed):
    b = np.random.default_rng(seed).normal(size=(n, n))
    return jnp.asarray(b + b.T)


@pytest.mark.parametrize("method, restart", [("loop", True), ("unrolled", False)])
def test_gradient_of_lanczos_extremes_past_the_dimension_is_finite_and_exact(x64, method, restart):
    """jax.grad of top + bottom eigenvalue (a sharpness penalty) with more Lanczos steps (8) than the dimension (6)
    was NaN in every entry: after the breakdown the Lanczos residuals are exactly zero, and the derivative of
    jnp.linalg.norm at zero is NaN.  Now it equals the derivative of the dense eigenvalues (exhausted Krylov space:
    the Ritz values are the eigenvalues)."""
    a0, v0 = _symmetric(6, 0), jnp.asarray(np.random.default_rng(1).normal(size=6))

    def lanczos(a):
        e = lanczos_extremes(lambda v: a @ v, v0, num_matvecs=8, k=2, method=method, restart=restart)
        return e.top[0] + e.bottom[0]

    def dense(a):
        w = jnp.linalg.eigvalsh(a)
        return w[-1] + w[0]

    value_and_grad = jax.jit(jax.value_and_grad(lanczos))
    (value, g), ref = value_and_grad(a0), jax.grad(dense)(a0)
    np.testing.assert_allclose(value, dense(a0), rtol=1e-12)
    assert bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_allclose(g + g.T, ref + ref.T, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(k=2.0), TypeError, r"lanczos_extremes: k must be an integer, got 2.0"),
    (dict(k=True), TypeError, r"lanczos_extremes: k must be an integer, got True"),
    (dict(num_matvecs=4.0), TypeError, r"lanczos_extremes: num_matvecs must be an integer, got 4.0"),
    (dict(v0=jnp.zeros(6)), ValueError, r"lanczos_extremes: v0 is zero"),
])
def test_lanczos_extremes_names_a_bad_argument(kwargs, error, match):
    """A float / bool k or num_matvecs passed the range check and failed inside the iteration with an error that
    named neither ("'float' object cannot be interpreted as an integer", "Shapes must be 1D sequences of concrete
    values of integer type", "iota does not accept dtype bool"); a zero v0 returned NaN silently."""
    a = jnp.diag(jnp.arange(6.0))
    kw = dict(dict(v0=jnp.ones(6), num_matvecs=5), **kwargs)
    with pytest.raises(error, match=match):
        lanczos_extremes(lambda v: a @ v, kw.pop("v0"), **kw)
