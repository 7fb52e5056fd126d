"""Data sets and batches on cases the other data tests leave out: NumPy fixed-width integer sizes, the padded
batch under float64, and exact references for the synthetic tasks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd import data


def _arrays(ds):
    return [np.asarray(getattr(ds, f)) for f in ("x_train", "y_train", "x_test", "y_test")]


@pytest.mark.parametrize("make,kw", [
    # 200 + 100 wrapped to 44 in uint8: 44 training examples and no test set, silently
    (data.teacher_student, dict(n_train=np.uint8(200), n_test=np.uint8(100), din=np.uint8(3))),
    (data.sparse_parity, dict(n_train=np.int16(20000), n_test=np.int16(20000), n_bits=np.int8(16), k=np.int8(2))),
    # p * p = 289 wrapped to 33 in uint8: a spurious refusal of train_fraction
    (data.modular_arithmetic, dict(p=np.uint8(17), train_fraction=0.5)),
    (data.modular_arithmetic, dict(p=np.int16(200), train_fraction=0.5, encoding="tokens")),
])
def test_numpy_fixed_width_integer_sizes_do_not_wrap(make, kw):
    ref = make(seed=1, **{k: (int(v) if isinstance(v, np.integer) else v) for k, v in kw.items()})
    got = make(seed=1, **kw)
    for a, b in zip(_arrays(got), _arrays(ref)):
        np.testing.assert_array_equal(a, b)
    assert got.num_classes == ref.num_classes and type(got.num_classes) is int


@pytest.mark.parametrize("sampler", data.SAMPLERS)
@pytest.mark.parametrize("bs_dtype", [jnp.int32, jnp.int64])
def test_padded_batch_under_x64(x64, sampler, bs_dtype):
    """With jax_enable_x64 the mask compared an int64 arange with the int32 batch size, which strict promotion
    refuses; the padded batch is now the unpadded one plus zero weights, eager and under jit, as without x64."""
    ds = data.teacher_student(n_train=40, n_test=4)
    k = jax.random.key(2)
    small = data.batch_fn(ds, 5, sampler=sampler)(jnp.int64(7), k)
    f = data.batch_fn(ds, jnp.asarray(5, bs_dtype), max_batch_size=8, sampler=sampler)
    for padded in (f(jnp.int64(7), k), jax.jit(f)(jnp.int64(7), k)):
        np.testing.assert_array_equal(np.asarray(padded["x"][:5]), np.asarray(small["x"]))
        np.testing.assert_array_equal(np.asarray(padded["w"]), [1, 1, 1, 1, 1, 0, 0, 0])
        assert padded["w"].dtype == jnp.float32 and padded["x"].dtype == jnp.float32


def test_teacher_student_targets_are_the_teachers_outputs_plus_noise():
    """Targets against the teacher recomputed in float64 from the documented draws; the residual's std is the
    stated noise scale (5000 x 3 draws: relative standard error ~0.6%)."""
    kw = dict(seed=5, n_train=4000, n_test=1000, din=6, dout=3, teacher_hidden=7)
    rng = np.random.default_rng([5, 1])
    w1, w2 = rng.normal(size=(6, 7)) / np.sqrt(6), rng.normal(size=(7, 3))
    for noise in (0.0, 0.3):
        x_tr, y_tr, x_te, y_te = _arrays(data.teacher_student(noise=noise, **kw))
        x, y = np.concatenate([x_tr, x_te]).astype(np.float64), np.concatenate([y_tr, y_te]).astype(np.float64)
        resid = y - np.tanh(x @ w1) @ w2 / np.sqrt(7)
        if noise == 0.0:
            np.testing.assert_allclose(resid, 0.0, atol=1e-6)
        else:
            assert abs(resid.std() / noise - 1) < 0.03, resid.std()


@pytest.mark.parametrize("n_bits,k,n_train", [(6, 6, 20), (1, 1, 1), (12, 3, 200)])
def test_sparse_parity_labels_are_the_parity_of_the_secret_bits(n_bits, k, n_train):
    ds = data.sparse_parity(seed=4, n_bits=n_bits, k=k, n_train=n_train, n_test=50)
    x_tr, y_tr, x_te, y_te = _arrays(ds)
    x, y = np.concatenate([x_tr, x_te]), np.concatenate([y_tr, y_te])
    bits = np.random.default_rng([4, 3]).choice(n_bits, size=k, replace=False)
    assert set(np.unique(x)) <= {-1.0, 1.0}
    # label 1 exactly when an odd number of the secret bits is -1
    np.testing.assert_array_equal(y, (np.sum(x[:, bits] < 0, axis=1) % 2).astype(np.int32))


def _rows(x):
    return [bytes(r) for r in np.asarray(np.asarray(x) > 0, np.uint8)]


@pytest.mark.parametrize("seed", [0, 5])
@pytest.mark.parametrize("n_bits,n_train", [(3, 6), (5, 100), (10, 1000), (24, 300)])
def test_sparse_parity_test_inputs_are_held_out(seed, n_bits, n_train):
    """No test input is a training input (independent draws repeated 28 of 100 at n_bits = 10); the test rows
    that hit no training input are the independent draws as they were (the draws of a large n_bits unchanged),
    and every label is still the parity of the secret bits."""
    ds = data.sparse_parity(seed=seed, n_bits=n_bits, k=2, n_train=n_train, n_test=200)
    x_tr, y_tr, x_te, y_te = _arrays(ds)
    train = set(_rows(x_tr))
    assert not any(r in train for r in _rows(x_te))
    # the draws before holding out: the same generator calls as the data set's
    rng = np.random.default_rng([data._tasks._seed("sparse_parity", seed), 3])
    bits = rng.choice(n_bits, size=2, replace=False)
    x = rng.choice(np.array([-1.0, 1.0]), size=(n_train + 200, n_bits))
    np.testing.assert_array_equal(x_tr, x[:n_train])
    kept = np.array([r not in train for r in _rows(x[n_train:])])
    np.testing.assert_array_equal(x_te[kept], x[n_train:][kept])
    assert (n_bits <= 10) == (not kept.all())  # small spaces had repeats to redraw, 2^24 none
    np.testing.assert_array_equal(y_te, (np.sum(x_te[:, bits] < 0, axis=1) % 2).astype(np.int32))


def test_sparse_parity_refuses_a_test_set_when_training_covers_every_input():
    with pytest.raises(ValueError, match=r"n_test=5 .* all 2\^n_bits = 8 inputs"):
        data.sparse_parity(seed=0, n_bits=3, k=2, n_train=200, n_test=5)
    assert len(np.asarray(data.sparse_parity(seed=0, n_bits=3, k=2, n_train=200, n_test=0).x_test)) == 0
    from quotient_sgd.config import ConfigError, default_config, validate

    cfg = default_config()
    cfg.data.name, cfg.data.n_bits, cfg.data.k, cfg.data.n_train, cfg.data.n_test = "sparse_parity", 3, 2, 200, 5
    with pytest.raises(ConfigError, match=r"config\.data\.n_test = 5: .* none is left to hold out"):
        validate(cfg)
    cfg.data.n_train, cfg.data.batch_size = 6, 0  # six draws cannot cover eight inputs
    validate(cfg)
