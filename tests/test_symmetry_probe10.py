"""Probe of the symmetry groups and models: the mean-field MMD across dtypes, the GL canonical point where
singular values repeat, and further group identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.models import mmd


def test_mmd_of_particle_sets_of_different_dtypes_is_computed_in_their_common_dtype(x64):
    """Under strict dtype promotion a float32 and a float64 particle set (or an integer / bfloat16 one) failed with
    JAX's bare ``TypePromotionError``; both are now computed in their common floating dtype, with the value of the
    common-dtype computation, and a complex set is refused naming the argument."""
    rng = np.random.default_rng(0)
    p64, q64 = rng.normal(size=(5, 3)), rng.normal(size=(4, 3))
    want = mmd(jnp.asarray(p64), jnp.asarray(q64))
    assert want.dtype == jnp.float64
    for p, q in [(jnp.asarray(p64, jnp.float32), jnp.asarray(q64)), (jnp.asarray(p64), jnp.asarray(q64, jnp.float32))]:
        got = mmd(p, q)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, mmd(jnp.asarray(p, jnp.float64), jnp.asarray(q, jnp.float64)), rtol=1e-12)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    # integers read as numbers; bfloat16 with float32 in float32
    ip, iq = jnp.asarray([[0, 1], [2, 3]], jnp.int32), jnp.asarray([[1.0, 1.0]], jnp.float32)
    np.testing.assert_allclose(mmd(ip, iq), mmd(jnp.asarray(ip, jnp.float32), iq), rtol=1e-6)
    assert mmd(ip, ip).dtype == jnp.float64 and float(mmd(ip, ip)) == 0.0
    low = mmd(jnp.asarray(p64, jnp.bfloat16), jnp.asarray(q64, jnp.float32))
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, mmd(jnp.asarray(jnp.asarray(p64, jnp.bfloat16), jnp.float32),
                                        jnp.asarray(q64, jnp.float32)), rtol=1e-6)
    # array-likes (nested lists) too; jit with mixed dtypes traces
    np.testing.assert_allclose(mmd(p64.tolist(), q64.tolist()), want, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(mmd)(jnp.asarray(p64, jnp.float32), jnp.asarray(q64)), want, rtol=1e-6)
    with pytest.raises(TypeError, match="mmd: q has dtype complex64"):
        mmd(jnp.asarray(p64, jnp.float32), jnp.asarray(q64, jnp.complex64))
