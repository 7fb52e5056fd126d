"""Data sets and batches, second probe: errors that name the argument, targets and inputs that ``make_dataset``
used to accept and that made the losses silently wrong, and the points ``swap_or_not`` permutes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd import data


@pytest.mark.parametrize("kw,arg,value", [
    (dict(batch_size=11), "batch_size", 11),
    (dict(batch_size=3, max_batch_size=11), "max_batch_size", 11),
])
def test_batch_larger_than_the_data_set_names_the_argument(kw, arg, value):
    # was "batch size 11 exceeds the 10 training examples": no argument (and with max_batch_size=11 the "batch
    # size" was the padded size, not the batch_size given)
    ds = data.teacher_student(n_train=10, n_test=2)
    with pytest.raises(ValueError, match=rf"batch_fn: {arg}={value} is not allowed; it exceeds the 10 training "
                                         r"examples of 'teacher_student': need an integer in \[1, 10\]"):
        data.batch_fn(ds, kw.pop("batch_size"), **kw)


# (the permutation sampler in the slow suite)
@pytest.mark.parametrize("sampler", [pytest.param(s, marks=pytest.mark.slow) if s == "permutation" else s
                                     for s in data.SAMPLERS])
def test_batch_of_the_whole_data_set_is_a_permutation_under_jit_vmap_and_scan(sampler):
    ds = data.teacher_student(n_train=12, n_test=2, din=2)
    ids = np.asarray(ds.x_train[:, 0])  # distinct Gaussian draws: an example's identity
    fn = data.batch_fn(ds, 12, sampler=sampler)

    def body(c, step):
        return c, fn(step, jax.random.fold_in(jax.random.key(5), step))["x"][:, 0]

    _, xs = jax.jit(lambda: jax.lax.scan(body, 0, jnp.arange(4)))()
    vm = jax.vmap(lambda s: fn(s, jax.random.fold_in(jax.random.key(5), s))["x"][:, 0])(jnp.arange(4))
    np.testing.assert_array_equal(np.asarray(xs), np.asarray(vm))
    for row in np.asarray(xs):
        np.testing.assert_array_equal(np.sort(row), np.sort(ids))  # every example exactly once
    assert len({tuple(r) for r in np.asarray(xs)}) == 4  # other steps (other keys), other orders
    # the batch is a function of the key alone (documented: train folds the step into the key)
    np.testing.assert_array_equal(np.asarray(fn(0, jax.random.key(2))["x"]), np.asarray(fn(7, jax.random.key(2))["x"]))
    # the full batch is the training set in order, whatever the step and key
    full = data.batch_fn(ds, None)(jnp.int32(3), jax.random.key(9))
    np.testing.assert_array_equal(np.asarray(full["x"]), np.asarray(ds.x_train))
    assert full["w"].dtype == jnp.float32 and float(full["w"].sum()) == 12


def _mk(x_train=None, y_train=None, x_test=None, y_test=None, task="classification", num_classes=3):
    x = np.zeros((4, 2), np.float32)
    y = np.array([0, 1, 2, 1]) if task == "classification" else np.zeros((4, num_classes))
    return data.make_dataset(x if x_train is None else x_train, y if y_train is None else y_train,
                             x[:2] if x_test is None else x_test, y[:2] if y_test is None else y_test,
                             task=task, num_classes=num_classes, name="probe")


@pytest.mark.parametrize("kw,needle", [
    # a (n,) regression target against an (n, 1) output broadcasts to an (n, n) difference: a wrong loss
    (dict(task="regression", num_classes=1, y_train=np.zeros(4)),
     r"make_dataset: y_train \(dtype float64, shape \(4,\)\) is not allowed; need real regression targets of shape "
     r"\(n, num_classes\) = \(4, 1\) \(a 1-D target: y\[:, None\]\)"),
    (dict(task="regression", num_classes=2, y_test=np.zeros((2, 3))), r"y_test .* shape \(2, 3\)"),
    # fractional labels were truncated to int32 (0.5 -> 0), out-of-range ones kept (a wrong cross-entropy)
    (dict(y_train=np.array([0.5, 1.0, 2.0, 1.0])),
     r"make_dataset: y_train \(dtype float64, shape \(4,\)\) is not allowed; need integer class indices in "
     r"\[0, num_classes\) = \[0, 3\) of shape \(4,\)"),
    (dict(y_train=np.array([0, 1, 3, 1])), r"y_train .* class indices in \[0, num_classes\) = \[0, 3\)"),
    (dict(y_test=np.array([-1, 0])), r"y_test .* class indices"),
    (dict(y_train=np.array([[0], [1], [2], [1]])), r"y_train \(dtype int64, shape \(4, 1\)\)"),
    # as many targets as inputs
    (dict(y_train=np.array([0, 1, 2])), r"y_train \(dtype int64, shape \(3,\)\) .* of shape \(4,\)"),
    (dict(x_test=np.zeros((2, 3), np.float32)),
     r"make_dataset: x_train's examples have shape \(2,\) and x_test's \(3,\)"),
    # complex inputs lost their imaginary part; integer tokens beyond int32 wrapped around
    (dict(x_train=np.ones((4, 2), complex)), r"make_dataset: x_train must be a real or boolean array .* complex128"),
    (dict(x_train=np.full((4, 2), 2**40)),
     r"make_dataset: x_train holds integer tokens outside the int32 range \(min 1099511627776"),
    (dict(num_classes=0), r"make_dataset: num_classes=0 is not allowed; need an integer >= 1"),
    (dict(num_classes=2.7), r"make_dataset: num_classes=2.7 is not allowed"),
    (dict(task="ranking"), r"make_dataset: task must be one of \('classification', 'regression'\), got 'ranking'"),
])
def test_make_dataset_refuses_arrays_the_losses_would_misread(kw, needle):
    with pytest.raises(ValueError, match=needle):
        _mk(**kw)


def test_make_dataset_still_takes_what_the_losses_read():
    ds = _mk(x_train=np.ones((4, 2), bool), y_train=np.array([0.0, 1.0, 2.0, 1.0]))
    assert ds.x_train.dtype == jnp.float32 and ds.y_train.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ds.y_train), [0, 1, 2, 1])
    tok = _mk(x_train=np.array([[0, 2**31 - 1]] * 4), x_test=np.array([[-2**31, 0]] * 2))
    assert tok.x_train.dtype == jnp.int32 and int(tok.x_test[0, 0]) == -2**31
    reg = _mk(task="regression", num_classes=2)
    assert reg.y_train.shape == (4, 2) and reg.y_train.dtype == jnp.float32
    # every generator's output, and empty test splits, pass the checks
    assert data.teacher_student(n_train=4, n_test=0, dout=2).y_test.shape == (0, 2)
    assert data.sparse_parity(n_train=4, n_test=0, n_bits=4, k=2).y_test.shape == (0,)
    assert data.modular_arithmetic(p=5, encoding="tokens").x_train.dtype == jnp.int32
    assert data.digits(layout="image").x_test.shape[1:] == (8, 8, 1)


def test_swap_or_not_refuses_points_outside_the_permuted_set():
    k = jax.random.key(0)
    # x >= n came back as other points (not a permutation: [0, 12) went to 10 values with repeats), a negative x
    # wrapped around in uint32, a float x was truncated
    for x, needle in ((jnp.arange(12), r"x holds values in \[0, 11\]; need integers in \[0, n\) = \[0, 10\)"),
                      (jnp.array([-1, 3]), r"x holds values in \[-1, 3\]"),
                      (jnp.array([1.5, 3.0]), r"x must hold integers in \[0, n\) = \[0, 10\), got dtype float32")):
        with pytest.raises(ValueError, match="swap_or_not: " + needle):
            data.swap_or_not(k, 10, x)
    # points inside the set: a permutation, the same eagerly and traced (a traced x is not checked)
    eager = np.asarray(data.swap_or_not(k, 10, jnp.arange(10, dtype=jnp.uint8)))
    np.testing.assert_array_equal(np.sort(eager), np.arange(10))
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: data.swap_or_not(k, 10, x))(jnp.arange(10))), eager)
    # sample_indices draws the same batch through it
    np.testing.assert_array_equal(np.asarray(data.sample_indices(k, 10, 4, "swap_or_not")), eager[:4])


@pytest.mark.parametrize("call,needle", [
    # were 0 rounds (no shuffle at all) for a fractional or negative n, and a ZeroDivisionError for n = 0
    (lambda: data.swap_or_not_rounds(1.5), r"swap_or_not_rounds: n=1.5 is not allowed; need an integer >= 0"),
    (lambda: data.swap_or_not_rounds(-3), r"swap_or_not_rounds: n=-3 is not allowed"),
    (lambda: data.swap_or_not_bound(0, 0, 8), r"swap_or_not_bound: n=0 is not allowed; need an integer >= 1"),
    (lambda: data.swap_or_not_bound(10, 11, 8), r"swap_or_not_bound: num_points=11 is not allowed; need an integer "
                                                r"in \[0, 10\]"),
    (lambda: data.swap_or_not_bound(10, 2, -8), r"swap_or_not_bound: rounds=-8 is not allowed; need an integer >= 0"),
])
def test_swap_or_not_rounds_and_bound_check_their_arguments(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()
    # the documented counts stand
    assert (data.swap_or_not_rounds(1348), data.swap_or_not_rounds(np.int64(60000)), data.swap_or_not_rounds(1)) \
        == (176, 224, 0)
    assert data.swap_or_not_bound(1348, 337, 176) <= 1e-6 < data.swap_or_not_bound(1348, 337, 168)
