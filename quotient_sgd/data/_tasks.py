"""Synthetic tasks (teacher-student, modular arithmetic, sparse parity) and scikit-learn's bundled digits.

Every generator is a deterministic function of its ``seed`` (NumPy's PCG64 on the host, so the arrays are the
same on every platform and JAX version), and returns a :class:`~quotient_sgd.data.Dataset` with a train/test split.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os

import numpy as np

from ._dataset import Dataset, _static_int, make_dataset


def _split(n: int, n_train: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(n)
    return perm[:n_train], perm[n_train:]


def _check(task: str, **checks) -> None:
    """``checks``: ``name=(value, ok, what)``; a ``ValueError`` naming the task, the argument and what is allowed
    for the first value that is not ``ok``."""
    for name, (value, ok, what) in checks.items():
        if not ok:
            raise ValueError(f"{task}: {name}={value!r} is not allowed; need {what}")


def _int_at_least(value, low: int) -> bool:
    """An integer ``>= low``: a Python or NumPy integer, or a concrete 0-d integer array (NumPy or JAX), as the
    ``seed`` (:func:`_seed`) takes; not a ``bool``, a float or a traced value.  (A JAX integer was refused as
    ``p=Array(5, dtype=int32) is not allowed; need an integer >= 2``.)"""
    if isinstance(value, (bool, np.bool_)):
        return False
    if not isinstance(value, (int, np.integer)):
        try:
            a = np.asarray(value)
        except Exception:  # e.g. a traced JAX value
            return False
        if a.ndim != 0 or a.dtype.kind not in "iu":
            return False
        value = a.item()
    return value >= low


def _real(value) -> bool:
    """A real number: a Python, NumPy or concrete JAX integer or float scalar (not a ``bool``, a string or ``None``)."""
    try:
        a = np.asarray(value)
    except Exception:  # e.g. a traced JAX value
        return False
    return a.ndim == 0 and a.dtype.kind in "iuf"


#: The most examples (train and test together) a data set may hold: batches index them with int32.
MAX_EXAMPLES = 2**31 - 1


def _physical_memory() -> int | None:
    """This machine's physical memory in bytes (``None`` where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def peak_bytes(task: str, **sizes: int) -> int:
    """About the peak host memory, in bytes, that building the data set ``task`` with the (integer) ``sizes`` takes:
    the float64 draws and the float32 copies of this module (arithmetic only: nothing is built), an upper bound of
    the peak that ``tracemalloc`` measures while the generator runs.
    ``teacher_student``: ``n_train, n_test, din, dout, teacher_hidden``; ``sparse_parity``: ``n_train, n_test,
    n_bits``; ``modular_arithmetic``: ``p`` and ``encoding`` (one-hot inputs grow as ``p^3``, tokens as ``p^2``)."""
    if task == "teacher_student":
        n, h = sizes["n_train"] + sizes["n_test"], sizes["teacher_hidden"]
        din, dout = sizes["din"], sizes["dout"]
        # per example: the float64 input (8 din) and its float32 copy with the finiteness checks' temporaries; the
        # hidden layer twice (x @ W1 and its tanh, 16 h: counted once, the estimate was half the measured peak at
        # teacher_hidden = 20000); the float64 targets with the noise draw and their float32 copy (20 dout); and the
        # teacher's weights din x h and h x dout
        return n * (16 * din + 20 * dout + 16 * h) + 8 * h * (din + dout)
    if task == "sparse_parity":
        return 20 * (sizes["n_train"] + sizes["n_test"]) * sizes["n_bits"]  # (int64 draws, float64 and float32)
    if task == "modular_arithmetic":
        pairs = sizes["p"] ** 2
        # tokens: the int64 grids, labels and token rows with their int32 copies and the split's gathers (measured
        # 70.5 bytes a pair at p = 1000; 64 were counted)
        return pairs * 24 * sizes["p"] if sizes.get("encoding", "onehot") == "onehot" else pairs * 80
    raise ValueError(f"peak_bytes: unknown task {task!r}")


def _check_size(task: str, sizes: dict, names: dict[str, int], n_examples, memory: int | None = None) -> None:
    """Refuse, before anything is allocated, a data set with more than :data:`MAX_EXAMPLES` examples or larger
    than this machine's memory (``peak_bytes``): a ``ValueError`` naming the argument among ``names`` (name ->
    default) to reduce, the one furthest above its default of those that alone can bring the data set within the
    limits, and the largest value of it that fits, the others as given.  (``teacher_student(n_train=10**12)``
    failed in a bare ``MemoryError: Unable to allocate 58.2 TiB``, ``modular_arithmetic(p=10**30)`` in NumPy's
    bare "Maximum allowed size exceeded".)"""

    def largest(name, fits):  # the largest value of `name` in [1, sizes[name]] for which `fits`, else 0
        lo, hi = 0, sizes[name]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits({**sizes, name: mid}):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def refuse(fits, why):
        best = {k: largest(k, fits) for k in names if sizes[k] >= 1}
        name = max(best, key=lambda k: (best[k] >= 1, sizes[k] / names[k]))
        others = ", ".join(f"{k}={v!r}" for k, v in sizes.items() if k != name)
        allowed = (f"an integer <= {best[name]} (with {others})" if best[name] >= 1 else
                   f"smaller values of {', '.join(names)}: no {name} fits with {others}")
        raise ValueError(f"{task}: {name}={sizes[name]!r} is not allowed; {why}; need {allowed}")

    memory = _physical_memory() if memory is None else memory
    fits = lambda s: n_examples(s) <= MAX_EXAMPLES and (memory is None or peak_bytes(task, **s) <= memory)  # noqa: E731
    if fits(sizes):
        return
    why = []
    if n_examples(sizes) > MAX_EXAMPLES:
        why.append(f"it makes {n_examples(sizes)} examples (train and test), more than the {MAX_EXAMPLES} an int32 "
                   f"index reaches")
    if memory is not None and peak_bytes(task, **sizes) > memory:
        why.append(f"the data set takes about {peak_bytes(task, **sizes) / 2**30:.4g} GiB to build, more than this "
                   f"machine's {memory / 2**30:.4g} GiB of memory")
    refuse(fits, "; ".join(why))


def _seed(task: str, seed) -> int:
    """``seed`` as a Python ``int`` (a Python or NumPy integer, or a concrete integer JAX scalar, ``>= 0``)."""
    return _static_int(task, "seed", seed, 0, None, "an integer >= 0")


def teacher_student(*, seed: int = 0, n_train: int = 512, n_test: int = 256, din: int = 8, dout: int = 1,
                    teacher_hidden: int = 16, noise: float = 0.0) -> Dataset:
    """Regression on the outputs of a random teacher ``y = tanh(x W1) W2 / sqrt(h) + noise * eps``.

    ``x ~ N(0, I_din)``, ``W1 ~ N(0, 1/din)``, ``W2 ~ N(0, 1)``, ``eps ~ N(0, 1)``; task ``"regression"``."""
    _check("teacher_student", n_train=(n_train, _int_at_least(n_train, 1), "an integer >= 1"),
           n_test=(n_test, _int_at_least(n_test, 0), "an integer >= 0"),
           din=(din, _int_at_least(din, 1), "an integer >= 1"), dout=(dout, _int_at_least(dout, 1), "an integer >= 1"),
           teacher_hidden=(teacher_hidden, _int_at_least(teacher_hidden, 1), "an integer >= 1"),
           noise=(noise, _real(noise) and bool(np.isfinite(noise) and noise >= 0), "a finite number >= 0"))
    # Python ints: NumPy fixed-width integers would wrap around in n_train + n_test
    n_train, n_test, din, dout, teacher_hidden = map(int, (n_train, n_test, din, dout, teacher_hidden))
    # a Python float: a JAX scalar made the targets a JAX computation (float32 on device without x64, a bare
    # TypePromotionError against the NumPy float64 draws under x64 and strict promotion)
    noise = float(noise)
    seed = _seed("teacher_student", seed)
    _check_size("teacher_student", dict(n_train=n_train, n_test=n_test, din=din, dout=dout,
                                        teacher_hidden=teacher_hidden),
                dict(n_train=512, n_test=256, din=8, dout=1, teacher_hidden=16), lambda s: s["n_train"] + s["n_test"])
    rng = np.random.default_rng([seed, 1])
    w1 = rng.normal(size=(din, teacher_hidden)) / np.sqrt(din)
    w2 = rng.normal(size=(teacher_hidden, dout))
    x = rng.normal(size=(n_train + n_test, din))
    y = np.tanh(x @ w1) @ w2 / np.sqrt(teacher_hidden) + noise * rng.normal(size=(n_train + n_test, dout))
    big = float(np.finfo(np.float32).max)
    # (a noise of 1e38 or more made targets beyond float32's range, refused by make_dataset as "y_train holds 99
    # value(s) that are not finite in float32", naming no argument of this function)
    _check("teacher_student", noise=(noise, bool(np.all(np.abs(y) <= big)),
                                     f"a noise whose targets y = teacher + noise * N(0, 1) stay finite in float32 "
                                     f"(|y| <= {big:.4g}; the largest |y| here is {float(np.max(np.abs(y))):.4g})"))
    return make_dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], task="regression", num_classes=dout,
                        name="teacher_student")


def modular_arithmetic(*, seed: int = 0, p: int = 23, train_fraction: float = 0.5, encoding: str = "onehot",
                       ) -> Dataset:
    """All pairs ``(a, b)``, ``0 <= a, b < p``, labelled ``(a + b) mod p`` (the grokking task), split at random.

    Args:
        encoding: ``"onehot"``: inputs ``concat(onehot(a), onehot(b))`` of length ``2p`` (for an MLP);
            ``"tokens"``: int sequences ``[a, b, p]`` (``p`` is the ``=`` token; vocabulary ``p + 1``) for a
            Transformer, which predicts the label at the last position.
        train_fraction: fraction of the ``p^2`` pairs used for training: ``round(train_fraction * p^2)`` of them
            (Python's ``round``, a half to the even count), the rest held out.
    """
    if encoding not in ("onehot", "tokens"):
        raise ValueError(f"encoding must be 'onehot' or 'tokens', got {encoding!r}")
    seed = _seed("modular_arithmetic", seed)
    _check("modular_arithmetic", p=(p, _int_at_least(p, 2), "an integer >= 2"))
    p = int(p)  # a NumPy fixed-width integer would wrap around in p * p
    _check_size("modular_arithmetic", dict(p=p, encoding=encoding), dict(p=23), lambda s: s["p"] ** 2)
    # the split is checked as it is made, in float64: a NumPy or JAX float32 fraction took the check's product in
    # float32 (np.float32(0.9999946) at p = 303: 91808 training pairs there, 91809 of 91809 in the split, and the
    # test split was empty, silently)
    ok = _real(train_fraction) and 0 < float(train_fraction) < 1 and 1 <= round(float(train_fraction) * p * p) < p * p
    _check("modular_arithmetic",
           train_fraction=(train_fraction, ok, f"0 < train_fraction < 1 leaving at least one pair on each side of the "
                                               f"split (p^2 = {p * p} pairs)"))
    train_fraction = float(train_fraction)  # a JAX float32 scalar took the product below in float32
    a, b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    a, b = a.ravel(), b.ravel()
    y = (a + b) % p
    if encoding == "onehot":
        eye = np.eye(p, dtype=np.float32)
        x = np.concatenate([eye[a], eye[b]], axis=1)
    else:
        x = np.stack([a, b, np.full_like(a, p)], axis=1).astype(np.int32)
    n_train = int(round(train_fraction * p * p))
    tr, te = _split(p * p, n_train, np.random.default_rng([seed, 2]))
    return make_dataset(x[tr], y[tr], x[te], y[te], task="classification", num_classes=p,
                        name=f"modular_arithmetic_{encoding}")


def sparse_parity(*, seed: int = 0, n_bits: int = 20, k: int = 3, n_train: int = 1024, n_test: int = 512,
                  ) -> Dataset:
    """``x`` uniform in ``{-1, +1}^n_bits``, label ``1`` when the product of ``k`` fixed (random) bits is ``-1``.

    Two classes; the relevant bits are drawn from ``seed`` too.  The test inputs are held out: a test draw equal
    to a training input is drawn again (for a small ``n_bits`` independent draws repeated training inputs, 28 of
    100 test rows at ``n_bits = 10``, so that test accuracy partly measured memorisation); test rows may repeat
    among themselves.  Draws that hit no training input are kept as they are.

    Raises:
        ValueError: an argument out of range, or ``n_test > 0`` when the training inputs are all ``2^n_bits``
            inputs (none is left to hold out)."""
    _check("sparse_parity", n_bits=(n_bits, _int_at_least(n_bits, 1), "an integer >= 1"))
    n_bits = int(n_bits)
    _check("sparse_parity", k=(k, _int_at_least(k, 1) and k <= n_bits, f"an integer in [1, n_bits] = [1, {n_bits}]"),
           n_train=(n_train, _int_at_least(n_train, 1), "an integer >= 1"),
           n_test=(n_test, _int_at_least(n_test, 0), "an integer >= 0"))
    n_bits, k, n_train, n_test = map(int, (n_bits, k, n_train, n_test))  # no wrap-around in n_train + n_test
    seed = _seed("sparse_parity", seed)
    _check_size("sparse_parity", dict(n_train=n_train, n_test=n_test, n_bits=n_bits),
                dict(n_train=1024, n_test=512, n_bits=20), lambda s: s["n_train"] + s["n_test"])
    rng = np.random.default_rng([seed, 3])
    bits = rng.choice(n_bits, size=k, replace=False)
    x = rng.choice(np.array([-1.0, 1.0]), size=(n_train + n_test, n_bits))
    if n_test:
        x[n_train:] = _held_out(rng, x[:n_train], x[n_train:])
    y = (np.prod(x[:, bits], axis=1) < 0).astype(np.int32)
    return make_dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], task="classification", num_classes=2,
                        name="sparse_parity")


def _held_out(rng: np.random.Generator, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """``test`` (rows in ``{-1, +1}^n``) with every row equal to a row of ``train`` drawn again from ``rng``
    until none is."""
    n_bits = train.shape[1]
    key = lambda rows: [r.tobytes() for r in np.packbits(rows > 0, axis=1)]  # noqa: E731
    seen = set(key(train))
    if n_bits < 63 and len(seen) >= 2**n_bits:
        raise ValueError(f"sparse_parity: n_test={len(test)} needs inputs outside the training set, but the "
                         f"n_train={len(train)} training inputs are all 2^n_bits = {2**n_bits} inputs of "
                         f"n_bits={n_bits}; use n_test=0, fewer training examples or more bits")
    test = test.copy()
    bad = np.array([b in seen for b in key(test)], bool)
    while bad.any():
        test[bad] = rng.choice(np.array([-1.0, 1.0]), size=(int(bad.sum()), n_bits))
        bad[bad] = [b in seen for b in key(test[bad])]
    return test


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images (1797, 8, 8) float64, target (1797,) int64)``: what ``sklearn.datasets.load_digits`` returns,
    read from the file it reads (``sklearn/datasets/data/digits.csv.gz``) without importing scikit-learn, whose
    import alone takes ~0.7 s; ``load_digits`` itself where that file is not found."""
    spec = importlib.util.find_spec("sklearn")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = os.path.join(root, "datasets", "data", "digits.csv.gz")
        if os.path.exists(path):
            with gzip.open(path, "rt") as f:
                data = np.loadtxt(f, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target.astype(np.int64)


def digits(*, seed: int = 0, test_fraction: float = 0.25, layout: str = "flat") -> Dataset:
    """scikit-learn's bundled handwritten digits (1797 images 8x8, 10 classes; no download), pixels in [0, 1].

    Args:
        layout: ``"flat"`` (``(n, 64)``, for an MLP) or ``"image"`` (``(n, 8, 8, 1)`` NHWC, for a CNN).
        test_fraction: fraction of the images held out, chosen at random from ``seed``.
    """
    if layout not in ("flat", "image"):
        raise ValueError(f"layout must be 'flat' or 'image', got {layout!r}")
    seed = _seed("digits", seed)
    _check("digits", test_fraction=(test_fraction, _real(test_fraction) and 0 < test_fraction < 1,
                                    "0 < test_fraction < 1"))
    test_fraction = float(test_fraction)  # a JAX float32 scalar took the product below in float32
    images, target = _digits_arrays()
    n = len(images)
    n_test = int(round(test_fraction * n))
    _check("digits", test_fraction=(test_fraction, 1 <= n_test < n,
                                    f"0 < test_fraction < 1 leaving at least one of the {n} images on each side of "
                                    f"the split (it holds out {n_test})"))
    x = (images / 16.0).astype(np.float32)
    x = x.reshape(len(x), 64) if layout == "flat" else x[..., None]
    tr, te = _split(n, n - n_test, np.random.default_rng([seed, 4]))
    return make_dataset(x[tr], target[tr], x[te], target[te], task="classification", num_classes=10,
                        name="digits")


#: name -> generator; the ``data.name`` of a config.
GENERATORS = {
    "teacher_student": teacher_student,
    "modular_arithmetic": modular_arithmetic,
    "sparse_parity": sparse_parity,
    "digits": digits,
}
