"""The runner's batch sampler: distinct indices, a uniformly random subset in random order, and the prefix
property a batch-size sweep relies on."""

import jax
import jax.numpy as jnp
import numpy as np

from quotient_sgd import data as qdata
from quotient_sgd.runner._batches import batch_fn, sample_indices


def test_distinct_uniform_and_prefix():
    keys = jax.random.split(jax.random.key(0), 6000)
    idx = np.asarray(jax.vmap(lambda k: sample_indices(k, 10, 4))(keys))
    assert idx.min() >= 0 and idx.max() < 10
    assert all(len(set(row)) == 4 for row in idx)
    # every index is equally likely in every position (6000 draws: 600 expected per cell, sd ~23)
    for pos in range(4):
        counts = np.bincount(idx[:, pos], minlength=10)
        assert np.abs(counts - 600).max() < 120, (pos, counts)
    # a smaller batch is the prefix of a larger one drawn with the same key
    small = np.asarray(jax.vmap(lambda k: sample_indices(k, 10, 2))(keys))
    np.testing.assert_array_equal(small, idx[:, :2])


def test_padded_batch_is_masked_prefix():
    ds = qdata.teacher_student(n_train=50, n_test=10)
    k = jax.random.key(3)
    small = batch_fn(ds, 5)(0, k)
    padded = batch_fn(ds, jnp.int32(5), max_batch_size=8)(0, k)
    np.testing.assert_array_equal(np.asarray(padded["x"][:5]), np.asarray(small["x"]))
    np.testing.assert_array_equal(np.asarray(padded["w"]), [1, 1, 1, 1, 1, 0, 0, 0])
    assert batch_fn(ds, None)(0, k)["x"].shape == (50, 8)
