"""Data sets: determinism per seed, splits, shapes, and on-device batch sampling inside lax.scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd import data


@pytest.mark.parametrize("name,kw", [
    ("teacher_student", dict(n_train=64, n_test=32)),
    ("modular_arithmetic", dict(p=7, encoding="onehot")),
    ("modular_arithmetic", dict(p=7, encoding="tokens")),
    ("sparse_parity", dict(n_bits=10, k=3, n_train=64, n_test=32)),
    ("digits", dict()),
    ("digits", dict(layout="image")),
])
def test_deterministic_per_seed_and_split(name, kw):
    gen = data.GENERATORS[name]
    a, b, c = gen(seed=0, **kw), gen(seed=0, **kw), gen(seed=1, **kw)
    for f in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)))
    assert not np.array_equal(np.asarray(a.x_train), np.asarray(c.x_train))
    assert a.num_train > 0 and a.num_test > 0
    assert a.x_train.shape[1:] == a.x_test.shape[1:]
    if a.task == "classification":
        assert a.y_train.dtype == jnp.int32
        assert int(jnp.max(a.y_train)) < a.num_classes


def test_modular_labels_and_disjoint_split():
    ds = data.modular_arithmetic(p=11, encoding="tokens", train_fraction=0.5)
    x = np.concatenate([np.asarray(ds.x_train), np.asarray(ds.x_test)])
    y = np.concatenate([np.asarray(ds.y_train), np.asarray(ds.y_test)])
    np.testing.assert_array_equal((x[:, 0] + x[:, 1]) % 11, y)
    assert np.all(x[:, 2] == 11)
    assert len({tuple(r) for r in x}) == 121  # every pair exactly once across the split


def test_sparse_parity_labels_depend_on_k_bits():
    ds = data.sparse_parity(n_bits=8, k=2, n_train=512, n_test=8, seed=3)
    x, y = np.asarray(ds.x_train), np.asarray(ds.y_train)
    found = [(i, j) for i in range(8) for j in range(i + 1, 8)
             if np.array_equal((x[:, i] * x[:, j] < 0).astype(int), y)]
    assert len(found) == 1


def test_batch_fn_inside_scan_and_prefix_property():
    ds = data.teacher_student(n_train=50, n_test=10)
    f = data.batch_fn(ds, 8)

    def body(c, step):
        b = f(step, jax.random.fold_in(jax.random.key(0), step))
        return c, b["x"]

    _, xs = jax.lax.scan(body, 0, jnp.arange(4))
    assert xs.shape == (4, 8, 8)
    assert not np.array_equal(np.asarray(xs[0]), np.asarray(xs[1]))
    # a batch of 5 is the prefix of the padded batch of 8 with weights (1,...,1,0,0,0)
    k = jax.random.key(3)
    small = data.batch_fn(ds, 5)(0, k)
    padded = data.batch_fn(ds, jnp.int32(5), max_batch_size=8)(0, k)
    np.testing.assert_array_equal(np.asarray(padded["x"][:5]), np.asarray(small["x"]))
    np.testing.assert_array_equal(np.asarray(padded["w"]), [1, 1, 1, 1, 1, 0, 0, 0])
    full = data.batch_fn(ds, None)(0, k)
    assert full["x"].shape == (50, 8)
    with pytest.raises(ValueError, match="exceeds"):
        data.batch_fn(ds, 51)


@pytest.mark.parametrize("make,needle", [
    (lambda: data.teacher_student(n_train=0), "teacher_student: n_train=0 is not allowed; need an integer >= 1"),
    (lambda: data.teacher_student(noise=-0.1), "teacher_student: noise=-0.1"),
    (lambda: data.modular_arithmetic(p=1), "modular_arithmetic: p=1 is not allowed; need an integer >= 2"),
    (lambda: data.modular_arithmetic(train_fraction=1.0), "modular_arithmetic: train_fraction=1.0"),
    (lambda: data.sparse_parity(n_train=0), "sparse_parity: n_train=0"),
    (lambda: data.digits(test_fraction=0.0), "digits: test_fraction=0.0"),
])
def test_task_arguments_are_checked(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()


def test_digits_are_scikit_learns_without_importing_it():
    """The digits are read from scikit-learn's own file, equal to ``load_digits``.  That loading them does not import
    scikit-learn (its import alone costs ~0.7 s of every run's start) is checked in a fresh process by
    tests/test_cli_run.py::test_start_up_imports_only_what_a_run_needs (building the quickstart loads the digits)."""
    from sklearn.datasets import load_digits

    from quotient_sgd.data._tasks import _digits_arrays

    images, target = _digits_arrays()
    ref = load_digits()
    np.testing.assert_array_equal(images, ref.images)
    np.testing.assert_array_equal(target, ref.target)
    ds = data.digits(seed=3, test_fraction=0.5)
    x = np.concatenate([np.asarray(ds.x_train), np.asarray(ds.x_test)]).reshape(-1, 64)
    y = np.concatenate([np.asarray(ds.y_train), np.asarray(ds.y_test)])
    rows = {(tuple(r), int(t)) for r, t in zip((ref.data / 16.0).astype(np.float32), ref.target)}
    assert len(x) == 1797 and all((tuple(r), int(t)) in rows for r, t in zip(x, y))


@pytest.mark.parametrize("sampler", data.SAMPLERS)
def test_batch_fn_edges(sampler):
    ds = data.teacher_student(n_train=10, n_test=2)
    k = jax.random.key(1)
    whole = data.batch_fn(ds, 10, sampler=sampler)(0, k)
    assert whole["x"].shape == (10, 8) and float(whole["w"].sum()) == 10
    np.testing.assert_array_equal(np.sort(np.asarray(whole["x"][:, 0])), np.sort(np.asarray(ds.x_train[:, 0])))
    one = data.batch_fn(ds, 1, sampler=sampler)(0, k)
    np.testing.assert_array_equal(np.asarray(one["x"]), np.asarray(whole["x"][:1]))
    # max_batch_size smaller than the batch size was a silent batch of max_batch_size, all weighted 1
    with pytest.raises(ValueError, match=r"batch_fn: batch_size=8 is not allowed; need an integer in "
                                         r"\[1, max_batch_size\] = \[1, 4\]"):
        data.batch_fn(ds, 8, max_batch_size=4, sampler=sampler)
    # an empty batch (weights summing to 0: a 0/0 loss), a negative or a fractional one are refused
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=f"batch_fn: batch_size={bad!r} is not allowed; need an integer >= 1, "
                                             "or None for the full batch"):
            data.batch_fn(ds, bad, sampler=sampler)
    with pytest.raises(ValueError, match="batch_fn: max_batch_size=0 is not allowed"):
        data.batch_fn(ds, 0, max_batch_size=0, sampler=sampler)
    # a traced batch size needs the padded size, and then gives the masked prefix
    with pytest.raises(ValueError, match="a traced batch_size needs a static max_batch_size"):
        jax.jit(lambda b: data.batch_fn(ds, b, sampler=sampler)(0, k)["x"])(3)
    w = jax.jit(lambda b: data.batch_fn(ds, b, max_batch_size=6, sampler=sampler)(0, k)["w"])(jnp.int32(3))
    np.testing.assert_array_equal(np.asarray(w), [1, 1, 1, 0, 0, 0])
    with pytest.raises(ValueError, match="a traced batch_size must be an integer scalar"):
        jax.jit(lambda b: data.batch_fn(ds, b, max_batch_size=6, sampler=sampler)(0, k)["w"])(jnp.float32(2.5))
    # the full batch takes no padded size and still checks the sampler's name
    with pytest.raises(ValueError, match="max_batch_size=4 needs a batch_size"):
        data.batch_fn(ds, None, max_batch_size=4, sampler=sampler)
    with pytest.raises(ValueError, match="sampler must be one of"):
        data.batch_fn(ds, None, sampler="shuffle")


@pytest.mark.parametrize("make,needle", [
    # wrong types were TypeErrors from NumPy naming no argument (or, for k=True, passed the range check first)
    (lambda: data.teacher_student(seed=-1), "teacher_student: seed=-1 is not allowed; need an integer >= 0"),
    (lambda: data.teacher_student(seed=None), "teacher_student: seed=None is not allowed"),
    (lambda: data.teacher_student(seed=1.5), "teacher_student: seed=1.5 is not allowed"),
    (lambda: data.teacher_student(seed=True), "teacher_student: seed=True is not allowed"),
    (lambda: data.teacher_student(noise="0.1"), "teacher_student: noise='0.1' is not allowed; need a finite number"),
    (lambda: data.teacher_student(noise=None), "teacher_student: noise=None is not allowed"),
    (lambda: data.teacher_student(noise=True), "teacher_student: noise=True is not allowed"),
    (lambda: data.modular_arithmetic(p="7"), "modular_arithmetic: p='7' is not allowed; need an integer >= 2"),
    (lambda: data.modular_arithmetic(p=None), "modular_arithmetic: p=None is not allowed"),
    (lambda: data.modular_arithmetic(train_fraction="0.5"), "modular_arithmetic: train_fraction='0.5' is not allowed"),
    (lambda: data.modular_arithmetic(train_fraction=None), "modular_arithmetic: train_fraction=None is not allowed"),
    (lambda: data.modular_arithmetic(seed=-3), "modular_arithmetic: seed=-3 is not allowed"),
    (lambda: data.sparse_parity(k=5, n_bits=3), r"sparse_parity: k=5 is not allowed; need an integer in \[1, n_bits\] "
                                                r"= \[1, 3\]"),
    (lambda: data.sparse_parity(k=0), "sparse_parity: k=0 is not allowed"),
    (lambda: data.sparse_parity(k=2.0), "sparse_parity: k=2.0 is not allowed"),
    (lambda: data.sparse_parity(k=True), "sparse_parity: k=True is not allowed"),
    (lambda: data.sparse_parity(k=None), "sparse_parity: k=None is not allowed"),
    (lambda: data.sparse_parity(n_bits=5.0, k=2), "sparse_parity: n_bits=5.0 is not allowed; need an integer >= 1"),
    (lambda: data.sparse_parity(seed=None), "sparse_parity: seed=None is not allowed"),
    (lambda: data.digits(test_fraction="0.2"), "digits: test_fraction='0.2' is not allowed; need 0 < test_fraction"),
    (lambda: data.digits(test_fraction=None), "digits: test_fraction=None is not allowed"),
    (lambda: data.digits(seed=-1), "digits: seed=-1 is not allowed"),
])
def test_task_argument_types_are_checked(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()


def test_integer_seeds_of_any_kind_give_the_same_data():
    ref = data.teacher_student(seed=3, n_train=8, n_test=4)
    for seed in (np.int64(3), np.int32(3), jnp.int32(3)):
        ds = data.teacher_student(seed=seed, n_train=8, n_test=4)
        np.testing.assert_array_equal(np.asarray(ds.x_train), np.asarray(ref.x_train))
        np.testing.assert_array_equal(np.asarray(ds.y_test), np.asarray(ref.y_test))
    ds = data.modular_arithmetic(seed=jnp.int32(2), p=5)
    np.testing.assert_array_equal(np.asarray(ds.y_train), np.asarray(data.modular_arithmetic(seed=2, p=5).y_train))


@pytest.mark.parametrize("fraction,side", [(1e-4, "holds out 0"), (0.9999, "holds out 1797")])
def test_digits_split_leaves_both_sides_non_empty(fraction, side):
    # was a silent empty test set (or an empty training set, whose batches are empty)
    with pytest.raises(ValueError, match=f"digits: test_fraction={fraction!r} is not allowed; need 0 < test_fraction "
                                         f"< 1 leaving at least one of the 1797 images on each side of the split "
                                         f"\\(it {side}\\)"):
        data.digits(test_fraction=fraction)
    ds = data.digits(test_fraction=1 / 1797)
    assert (ds.num_train, ds.num_test) == (1796, 1)
    ds = data.digits(test_fraction=1796 / 1797)
    assert (ds.num_train, ds.num_test) == (1, 1796)


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.int16, jnp.int32])
def test_batch_fn_traced_batch_size_of_any_integer_dtype(dtype):
    # under strict dtype promotion (the tests' setting) a uint8 / int16 batch size failed the mask's comparison
    ds = data.teacher_student(n_train=10, n_test=2)
    w = jax.jit(lambda b: data.batch_fn(ds, b, max_batch_size=6)(0, jax.random.key(0))["w"])(jnp.asarray(4, dtype))
    np.testing.assert_array_equal(np.asarray(w), [1, 1, 1, 1, 0, 0])
