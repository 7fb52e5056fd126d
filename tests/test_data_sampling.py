"""The swap-or-not sampler: a bijection of ``[0, n)`` for every key, uniform statistics of its draws, the round
count's bound, and its argument checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd import data as qdata


# (2, 7, 10 and 257 in the slow suite)
@pytest.mark.parametrize("n", [1, pytest.param(2, marks=pytest.mark.slow), 3, pytest.param(7, marks=pytest.mark.slow),
                               pytest.param(10, marks=pytest.mark.slow), pytest.param(257, marks=pytest.mark.slow),
                               1348])
def test_swap_or_not_is_a_permutation(n):
    keys = jax.random.split(jax.random.key(n), 5)
    images = np.asarray(jax.vmap(lambda k: qdata.swap_or_not(k, n, jnp.arange(n)))(keys))
    for row in images:
        np.testing.assert_array_equal(np.sort(row), np.arange(n))
    if n >= 7:  # different keys give different permutations (7! = 5040 of them)
        assert len({tuple(r) for r in images}) == len(images)


def test_swap_or_not_pairs_are_uniform():
    # the ordered pair of the first two draws from 10 examples: 90 equally likely values
    keys = jax.random.split(jax.random.key(1), 18000)
    idx = np.asarray(jax.vmap(lambda k: qdata.sample_indices(k, 10, 2, "swap_or_not"))(keys))
    assert (idx[:, 0] != idx[:, 1]).all()
    counts = np.bincount(idx[:, 0] * 10 + idx[:, 1], minlength=100).reshape(10, 10)
    assert (np.diag(counts) == 0).all()
    expected = len(keys) / 90
    chi2 = ((counts - expected) ** 2 / expected)[~np.eye(10, dtype=bool)].sum()
    assert chi2 < 89 + 6 * math.sqrt(2 * 89), chi2  # df 89: mean 89, sd 13.3


def test_swap_or_not_inclusion_is_uniform_on_the_digits_size():
    n, b = 1348, 64
    keys = jax.random.split(jax.random.key(2), 3000)
    idx = np.asarray(jax.vmap(lambda k: qdata.sample_indices(k, n, b, "swap_or_not"))(keys))
    assert all(len(set(row)) == b for row in idx[:200])
    counts = np.bincount(idx.ravel(), minlength=n)
    expected = len(keys) * b / n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < (n - 1) + 6 * math.sqrt(2 * (n - 1)), chi2
    # no pull towards the keys' pairing structure: the sum of the first two draws is uniform mod n
    s = np.bincount((idx[:, 0] + idx[:, 1]) % 8, minlength=8)
    assert np.abs(s - len(keys) / 8).max() < 6 * math.sqrt(len(keys) / 8), s


@pytest.mark.parametrize("n", [2, 10, 1348, 60000])
def test_rounds_are_the_fewest_meeting_the_bound(n):
    r = qdata.swap_or_not_rounds(n)
    assert r % 8 == 0
    q = -(-n // 4)
    assert qdata.swap_or_not_bound(n, q, r) <= 1e-6 < qdata.swap_or_not_bound(n, q, r - 8)


def test_swap_or_not_checks_n():
    with pytest.raises(ValueError, match=r"swap_or_not: n=0 is not allowed; need an integer in \[1, 2\^31\)"):
        qdata.swap_or_not(jax.random.key(0), 0, jnp.arange(1))
    # a fractional n was truncated by the uint32 cast (10.5 drew a permutation of 10); rounds < 0 was an MLIRError
    for bad in (10.5, 10.0, True, 2**31):
        with pytest.raises(ValueError, match=f"swap_or_not: n={bad!r} is not allowed"):
            qdata.swap_or_not(jax.random.key(0), bad, jnp.arange(1))
    for bad in (-1, 8.5):
        with pytest.raises(ValueError, match=f"swap_or_not: rounds={bad!r} is not allowed; need an integer >= 0"):
            qdata.swap_or_not(jax.random.key(0), 10, jnp.arange(3), rounds=bad)
    np.testing.assert_array_equal(np.asarray(qdata.swap_or_not(jax.random.key(0), 10, jnp.arange(3), rounds=0)),
                                  [0, 1, 2])
    with pytest.raises(ValueError, match="sampler must be one of"):
        qdata.sample_indices(jax.random.key(0), 10, 2, "shuffle")


@pytest.mark.parametrize("sampler", qdata.SAMPLERS)
def test_sample_indices_edges_of_batch_size(sampler):
    key = jax.random.key(0)
    assert qdata.sample_indices(key, 10, 0, sampler).shape == (0,)
    assert qdata.sample_indices(key, 0, 0, sampler).shape == (0,)
    whole = np.asarray(qdata.sample_indices(key, 10, 10, sampler))
    np.testing.assert_array_equal(np.sort(whole), np.arange(10))
    np.testing.assert_array_equal(np.asarray(qdata.sample_indices(key, 10, 1, sampler)), whole[:1])
    np.testing.assert_array_equal(np.asarray(qdata.sample_indices(key, np.int64(10), np.int32(3), sampler)),
                                  whole[:3])
    # more than n distinct indices cannot exist: refused (was a silent short batch, or repeated indices)
    with pytest.raises(ValueError, match=r"sample_indices: batch_size=11 is not allowed; need an integer in \[0, n\]"):
        qdata.sample_indices(key, 10, 11, sampler)
    # a negative batch was n - 1 indices (a Python slice) for the permutation
    with pytest.raises(ValueError, match="sample_indices: batch_size=-1 is not allowed"):
        qdata.sample_indices(key, 10, -1, sampler)
    for bad in (3.0, True, "3", None):
        with pytest.raises(ValueError, match="sample_indices: batch_size="):
            qdata.sample_indices(key, 10, bad, sampler)
    with pytest.raises(ValueError, match="sample_indices: n=10.0 is not allowed"):
        qdata.sample_indices(key, 10.0, 3, sampler)
    with pytest.raises(ValueError, match="batch_size must be a static"):
        jax.jit(lambda b: qdata.sample_indices(key, 10, b, sampler))(3)


def test_float_batch_size_does_not_poison_later_draws():
    # lax.top_k caches on k, and 3.0 == 3: a refused float must not reach it, or later calls with k=3 fail
    key = jax.random.key(5)
    with pytest.raises(ValueError, match="batch_size"):
        qdata.sample_indices(key, 13, 3.0, "top_k")
    assert qdata.sample_indices(key, 13, 3, "top_k").shape == (3,)


@pytest.mark.parametrize("sampler", qdata.SAMPLERS)
def test_draws_do_not_depend_on_x64(sampler):
    # a run draws the same batches with float64 enabled or not (top_k once drew float64 uniforms under x64)
    key = jax.random.key(3)
    plain = qdata.sample_indices(key, 1348, 64, sampler)
    with jax.enable_x64(True):
        wide = qdata.sample_indices(key, 1348, 64, sampler)
    assert plain.dtype == wide.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(wide))
