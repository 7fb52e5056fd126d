"""The mean-field network's quotient: the empirical particle measure, its moments and MMD."""

import jax
import numpy as np
from flax import nnx

from quotient_sgd.models import MeanField, mmd, particle_moments, particles
from quotient_sgd.symmetry import verify


def _sets(n=12, k=5):
    p = jax.random.normal(jax.random.key(0), (n, k))
    q = jax.random.normal(jax.random.key(1), (n + 3, k)) * 1.5 + 0.3
    return p, q


def test_particles_layout():
    model = MeanField(3, 6, 2, rngs=nnx.Rngs(0))
    p = particles(model)
    assert p.shape == (6, 3 + 1 + 2)
    np.testing.assert_array_equal(p[:, :3], model.w_in[...])
    np.testing.assert_array_equal(p[:, 3], model.b[...])
    np.testing.assert_array_equal(p[:, 4:], model.w_out[...])
    np.testing.assert_array_equal(particles(nnx.state(model, nnx.Param)), p)


def test_moments_and_mmd_are_permutation_invariant():
    p, q = _sets()
    perm = jax.random.permutation(jax.random.key(2), p.shape[0])
    mp, mpp = particle_moments(p), particle_moments(p[perm])
    for k in ("mean", "second_moment"):
        np.testing.assert_allclose(mp[k], mpp[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mp["second_moment"], p.T @ p / p.shape[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mmd(p[perm], q, squared=True), mmd(p, q, squared=True), rtol=1e-5)
    assert float(mmd(p, p[perm], squared=True)) < 1e-6


def test_mmd_zero_on_equal_and_positive_on_different_sets():
    p, q = _sets()
    assert float(mmd(p, p)) == 0.0
    assert float(mmd(p, q)) > 0.1
    np.testing.assert_allclose(mmd(p, q), mmd(q, p), rtol=1e-5)
    # one particle moved: still positive
    assert float(mmd(p, p.at[0, 0].add(1.0), squared=True)) > 0
    # squared is the square
    np.testing.assert_allclose(mmd(p, q) ** 2, mmd(p, q, squared=True), rtol=1e-5)
    # larger bandwidth sees less
    assert float(mmd(p, q, bandwidth=10.0)) < float(mmd(p, q, bandwidth=1.0))


def test_balanced_particles_are_rescale_invariant():
    model = MeanField(3, 8, 2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (10, 3))
    group = model.symmetries()
    assert [c.name for c in group.components] == ["rescale/particles", "permutation/particles"]
    assert verify(model, group, x, jax.random.key(4), rtol=1e-5) <= 1e-5
    params = nnx.state(model, nnx.Param)
    gparams = group.act(group.sample(jax.random.key(5), params), params)
    raw, graw = particles(params), particles(gparams)
    assert float(mmd(raw, graw, squared=True)) > 1e-3  # raw measure is not rescale invariant
    bal, gbal = particles(params, balanced=True), particles(gparams, balanced=True)
    assert float(mmd(bal, gbal, squared=True)) < 1e-6
    for k in ("mean", "second_moment"):
        np.testing.assert_allclose(particle_moments(bal)[k], particle_moments(gbal)[k], rtol=1e-4, atol=1e-5)


def test_tanh_meanfield_declares_only_permutation():
    model = MeanField(2, 4, 1, activation="tanh", rngs=nnx.Rngs(0))
    assert [c.name for c in model.symmetries().components] == ["permutation/particles"]
