"""Probe of the symmetry groups and models: the mean-field MMD across dtypes, the GL canonical point where
singular values repeat, and further group identities."""

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
    # integers read as numbers
    ip, iq = jnp.asarray([[0, 1], [2, 3]], jnp.int32), jnp.asarray([[1.0, 1.0]], jnp.float32)
    np.testing.assert_allclose(mmd(ip, iq), mmd(jnp.asarray(ip, jnp.float32), iq), rtol=1e-6)
    assert mmd(ip, ip).dtype == jnp.float64 and float(mmd(ip, ip)) == 0.0
    # array-likes (nested lists) too
    np.testing.assert_allclose(mmd(p64.tolist(), q64.tolist()), want, rtol=1e-12)
    with pytest.raises(TypeError, match="mmd: q has dtype complex64"):
        mmd(jnp.asarray(p64, jnp.float32), jnp.asarray(q64, jnp.complex64))


def test_particles_and_moments_of_mixed_or_integer_dtypes(x64):
    """``particles`` of float32 weights with a float64 bias, and ``particle_moments`` of integer particles, failed
    under strict promotion (``TypePromotionError`` in the concatenation / the division by n); they are computed in
    the common floating dtype now, with the values of that computation."""
    from quotient_sgd.models import particle_moments, particles

    rng = np.random.default_rng(0)
    p64 = {"w_in": rng.normal(size=(4, 2)), "b": rng.normal(size=(4,)), "w_out": rng.normal(size=(4, 3))}
    mixed = {k: jnp.asarray(v, jnp.float64 if k == "b" else jnp.float32) for k, v in p64.items()}
    same = {k: jnp.asarray(v, jnp.float64) for k, v in mixed.items()}
    for balanced in (False, True):
        got = particles(mixed, balanced=balanced)
        assert got.dtype == jnp.float64
        np.testing.assert_array_equal(got, particles(same, balanced=balanced))
    ints = jnp.asarray([[0, 1], [2, 3], [4, 6]], jnp.int32)
    mom = particle_moments(ints)
    want = particle_moments(ints.astype(jnp.float64))
    for k in want:
        assert mom[k].dtype == jnp.float64
        np.testing.assert_array_equal(mom[k], want[k])
