"""A train/test data set held on device, and on-device batch sampling that runs inside ``lax.scan``."""

from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

TASKS = ("classification", "regression")


class Dataset(eqx.Module):
    """Train and test arrays of one task (a pytree: the arrays are leaves, the description is static).

    Attributes:
        x_train, y_train, x_test, y_test: inputs and targets; the leading axis indexes examples.  Classification
            targets are ``int32`` class indices, regression targets ``float32`` arrays ``(n, dout)``.
        task: ``"classification"`` (cross-entropy) or ``"regression"`` (mean squared error).
        num_classes: number of classes (classification), else the target dimension.
        name: the generator's name, e.g. ``"digits"``.
    """

    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    task: str = eqx.field(static=True)
    num_classes: int = eqx.field(static=True)
    name: str = eqx.field(static=True, default="dataset")

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def output_dim(self) -> int:
        return int(self.num_classes)


def make_dataset(x_train, y_train, x_test, y_test, *, task: str, num_classes: int, name: str) -> Dataset:
    """Build a :class:`Dataset` from host arrays, fixing dtypes (float32 inputs unless integer tokens).

    Inputs are real arrays with one leading example axis, the same example shape in both splits; integer inputs
    (tokens) become ``int32`` and must fit it, any other real or boolean input becomes ``float32`` and must be finite
    there (no NaN or inf, magnitudes within float32's range), as must regression targets.  JAX's extra real dtypes
    (``bfloat16``, ``float8_*``, ``int4`` ...) are read as the floats / integers they hold.
    Classification targets are integer-valued class indices ``(n,)`` in ``[0, num_classes)`` (stored ``int32``, so a
    classification ``num_classes`` is at most ``2^31 - 1``);
    regression targets are real ``(n, num_classes)`` arrays (stored ``float32``): the losses compare them with the
    model's ``(n, num_classes)`` outputs, and a ``(n,)`` target would broadcast against an ``(n, 1)`` output to an
    ``(n, n)`` difference.  Each split has as many targets as inputs; the training split at least one example.

    Raises:
        ValueError: naming the argument, the value (or its shape / dtype) and what is allowed.
    """
    if task not in TASKS:
        raise ValueError(f"make_dataset: task must be one of {TASKS}, got {task!r}")
    # (classification targets are stored int32: with num_classes = 2^32 a class index 2^31 was accepted and stored
    # as -2^31, silently, and cross-entropy read a label outside [0, num_classes))
    num_classes = _static_int("make_dataset", "num_classes", num_classes, 1)
    if task == "classification":
        _static_int("make_dataset", "num_classes", num_classes, 1, 2**31 - 1,
                    "an integer in [1, 2^31 - 1] for classification (the class indices are stored int32)")

    def _x(arg, a):
        a = _host(a, arg)
        if a.dtype.kind not in "biuf" or a.ndim < 1:
            raise ValueError(f"make_dataset: {arg} must be a real or boolean array with a leading example axis, got "
                             f"dtype {a.dtype} and shape {a.shape}")
        if a.dtype.kind in "iu":
            if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
                raise ValueError(f"make_dataset: {arg} holds integer tokens outside the int32 range "
                                 f"(min {a.min()}, max {a.max()}); need values in [-2^31, 2^31)")
            return jnp.asarray(a, jnp.int32)
        _finite_float32(arg, a, "inputs")
        return jnp.asarray(a, jnp.float32)

    def _y(arg, a, n):
        a = _host(a, arg)
        if task == "classification":
            ok = a.dtype.kind in "iuf" and a.shape == (n,)
            if ok and a.size:
                ok = bool(np.all(np.isfinite(a)) and np.all(a == np.round(a)) and a.min() >= 0
                          and a.max() < num_classes)
            if not ok:
                raise ValueError(f"make_dataset: {arg} (dtype {a.dtype}, shape {a.shape}) is not allowed; need "
                                 f"integer class indices in [0, num_classes) = [0, {num_classes}) of shape ({n},)")
            return jnp.asarray(a, jnp.int32)
        if a.dtype.kind not in "iuf" or a.shape != (n, num_classes):
            raise ValueError(f"make_dataset: {arg} (dtype {a.dtype}, shape {a.shape}) is not allowed; need real "
                             f"regression targets of shape (n, num_classes) = ({n}, {num_classes})"
                             + (" (a 1-D target: y[:, None])" if a.shape == (n,) and num_classes == 1 else ""))
        _finite_float32(arg, a, "regression targets")
        return jnp.asarray(a, jnp.float32)

    xtr, xte = _x("x_train", x_train), _x("x_test", x_test)
    if not xtr.shape[0]:  # every loss over it is 0 / 0, and batch_fn asked for a batch size "in [1, 0]"
        raise ValueError(f"make_dataset: x_train holds no example (shape {xtr.shape}); need at least one training "
                         "example (the test split may be empty)")
    if xtr.shape[1:] != xte.shape[1:]:
        raise ValueError(f"make_dataset: x_train's examples have shape {xtr.shape[1:]} and x_test's {xte.shape[1:]}; "
                         "need the same example shape in both splits")
    ytr, yte = _y("y_train", y_train, xtr.shape[0]), _y("y_test", y_test, xte.shape[0])
    return Dataset(xtr, ytr, xte, yte, task, num_classes, name)


def _host(a, arg: str) -> np.ndarray:
    """``a`` as a NumPy array, JAX's extra real dtypes (``ml_dtypes``: ``bfloat16``, ``float8_*``, ``int4`` ...,
    whose NumPy ``kind`` is ``"V"``) read exactly as ``float32`` / ``int32``: a bfloat16 input or target was refused
    as ``x_train must be a real or boolean array ..., got dtype bfloat16``.  Nested lists of unequal lengths are
    refused naming ``arg`` (NumPy's bare "setting an array element with a sequence ... inhomogeneous shape")."""
    try:
        a = np.asarray(a)
    except ValueError as e:
        raise ValueError(f"make_dataset: {arg} is not allowed: it is no array of one shape ({e}); need a real "
                         f"array with a leading example axis, every example of the same shape") from None
    if a.dtype.kind == "V":
        if jnp.issubdtype(a.dtype, jnp.floating):
            return a.astype(np.float32)
        if jnp.issubdtype(a.dtype, jnp.integer):
            return a.astype(np.int32)
    return a


def _finite_float32(arg: str, a: np.ndarray, what: str) -> None:
    """``ValueError`` naming ``arg`` unless the real array ``a`` is finite in float32, the dtype it is stored in: a NaN
    or infinite input or regression target (or one beyond float32's range, 1e39, which the cast made inf with only
    a RuntimeWarning) was accepted silently, and every loss it entered was NaN or inf."""
    if a.dtype.kind != "f" or not a.size:
        return
    big = float(np.finfo(np.float32).max)
    bad = ~np.isfinite(a)
    if a.dtype.itemsize > 4:  # (float16 cannot exceed float32's range, and comparing it with big overflowed)
        bad |= np.abs(a) > big
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"make_dataset: {arg} holds {int(bad.sum())} value(s) that are not finite in float32 (the "
                         f"first, {float(a[where])!r}, at index {where}); need finite {what} of magnitude <= {big:.4g}")


def _static_int(where: str, name: str, value, low: int, high: int | None = None, what: str | None = None) -> int:
    """``value`` as a Python ``int`` in ``[low, high]``: a Python or NumPy integer or a concrete integer JAX scalar
    (not a ``bool``, a float or a traced value); otherwise a ``ValueError`` naming ``where``, the argument and what is
    allowed."""
    bound = f"[{low}, {high}]" if high is not None else f">= {low}"
    need = what or f"an integer {'in ' if high is not None else ''}{bound}"
    if isinstance(value, jax.core.Tracer):
        raise ValueError(f"{where}: {name} must be a static (Python) integer, got a traced value; need {need}")
    # a Python int of any size (np.asarray makes one beyond 64 bits an object array: a seed of 2^64 was refused as
    # "need an integer >= 0")
    ok = not isinstance(value, (bool, np.bool_)) and (
        isinstance(value, int) or (np.issubdtype(np.asarray(value).dtype, np.integer) and np.ndim(value) == 0))
    if ok:
        value = int(value)
        ok = value >= low and (high is None or value <= high)
    if not ok:
        raise ValueError(f"{where}: {name}={value!r} is not allowed; need {need}")
    return value


#: How :func:`sample_indices` draws: each gives a uniformly random subset in uniformly random order (``"swap_or_not"``
#: to within a stated distance, see :func:`swap_or_not_rounds`).
SAMPLERS = ("permutation", "top_k", "swap_or_not")

#: Distance from uniform that :func:`swap_or_not_rounds` sizes the shuffle for.
SWAP_OR_NOT_TOLERANCE = 1e-6


def swap_or_not_bound(n: int, num_points: int, rounds: int) -> float:
    """Upper bound on the total-variation distance between the swap-or-not permutation of ``[0, n)`` with
    ``rounds`` rounds, evaluated at ``num_points`` fixed points, and a uniformly random permutation evaluated
    there: ``4 n^(3/2) / (rounds + 4) * ((num_points + n) / (2 n))^(rounds / 4 + 1)``, the bound of Hoang, Morris
    and Rogaway (CRYPTO 2012) for the swap-or-not shuffle with ideal round keys and round functions (stated
    there for adaptive forward and inverse queries; evaluating fixed points is the weaker, non-adaptive case,
    whose advantage is the total-variation distance).

    ``n >= 1``, ``0 <= num_points <= n`` and ``rounds >= 0`` are integers; anything else is refused with a
    ``ValueError``."""
    n = _static_int("swap_or_not_bound", "n", n, 1)
    num_points = _static_int("swap_or_not_bound", "num_points", num_points, 0, n)
    rounds = _static_int("swap_or_not_bound", "rounds", rounds, 0)
    return 4.0 * n**1.5 / (rounds + 4) * ((num_points + n) / (2.0 * n)) ** (rounds / 4 + 1)


def swap_or_not_rounds(n: int) -> int:
    """Rounds of the ``"swap_or_not"`` sampler on ``n`` examples: the smallest multiple of 8 for which
    :func:`swap_or_not_bound` is at most :data:`SWAP_OR_NOT_TOLERANCE` for batches of up to a quarter of the
    data set (``ceil(n / 4)``).  The count depends on ``n`` only, so a smaller batch is a prefix of a larger one
    drawn with the same key (the bound for a larger batch is weaker: 3e-3 for half of the 1348 digits).  176
    rounds for the 1348 digits, 224 for 60000 examples; 0 for ``n <= 1``.  ``n`` is an integer ``>= 0``."""
    n = _static_int("swap_or_not_rounds", "n", n, 0)
    if n < 2:
        return 0
    q = -(-n // 4)
    r = 8
    while swap_or_not_bound(n, q, r) > SWAP_OR_NOT_TOLERANCE:
        r += 8
    return r


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of ``uint32`` whose every output bit depends on every input
    bit (the round function of the swap-or-not shuffle)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def swap_or_not(key, n: int, x: jax.Array, rounds: int | None = None) -> jax.Array:
    """``pi(x)`` for the pseudo-random permutation ``pi`` of ``[0, n)`` drawn from ``key`` by the swap-or-not
    shuffle (Hoang, Morris and Rogaway, CRYPTO 2012), evaluated only at the points ``x`` (integers in
    ``[0, n)``): ``O(rounds * len(x))`` work instead of the ``O(n log n)`` of a whole permutation.

    Round ``r`` pairs each ``x`` with ``K_r - x (mod n)`` and swaps the pair or not by one bit of a hash of
    ``(salt_r, max(x, K_r - x))``; the pair's two members agree on that bit, so every round is an involution
    and ``pi`` is a bijection whatever the keys.  ``K_r`` and ``salt_r`` are 32-bit draws from ``key``
    (``K_r = bits mod n``: off uniform by at most ``n / 2^32``); the round function is MurmurHash3's
    finaliser of ``x ^ salt_r``, a pseudo-random stand-in for the ideal round function of the bound
    (:func:`swap_or_not_bound`).  ``rounds`` defaults to :func:`swap_or_not_rounds` ``(n)``.

    ``x`` must have an integer dtype; a concrete ``x`` with an entry outside ``[0, n)`` is refused with a
    ``ValueError`` (such a point is not in the permuted set: a negative one wraps around in ``uint32`` and the
    result is no permutation); a traced ``x`` is not checked."""
    n = _static_int("swap_or_not", "n", n, 1, 2**31 - 1, "an integer in [1, 2^31)")
    rounds = swap_or_not_rounds(n) if rounds is None else _static_int("swap_or_not", "rounds", rounds, 0)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"swap_or_not: x must hold integers in [0, n) = [0, {n}), got dtype {x.dtype}")
    if not isinstance(x, jax.core.Tracer) and x.size:
        lo, hi = int(jnp.min(x)), int(jnp.max(x))
        if lo < 0 or hi >= n:
            raise ValueError(f"swap_or_not: x holds values in [{lo}, {hi}]; need integers in [0, n) = [0, {n})")
    return _swap_or_not(key, n, x.astype(jnp.uint32), rounds)


def _swap_or_not(key, n: int, x: jax.Array, rounds: int) -> jax.Array:
    """:func:`swap_or_not` without the checks: ``x`` ``uint32`` in ``[0, n)``, ``n`` and ``rounds`` static."""
    if rounds == 0:
        return x.astype(jnp.int32)
    bits = jax.random.bits(key, (2, rounds), jnp.uint32)
    nn = jnp.uint32(n)
    ks, salts = bits[0] % nn, bits[1]

    def one_round(r, x):
        partner = (ks[r] + nn - x) % nn
        flip = (_fmix32(jnp.maximum(x, partner) ^ salts[r]) >> 31) == 1
        return jnp.where(flip, partner, x)

    return jax.lax.fori_loop(0, rounds, one_round, x).astype(jnp.int32)


def sample_indices(key, n: int, batch_size: int, sampler: str = "permutation") -> jax.Array:
    """``batch_size`` distinct indices in ``[0, n)``: a uniformly random subset in uniformly random order.

    ``sampler="permutation"``: the first entries of ``jax.random.permutation(key, n)`` (a sort of all ``n`` at
    every call).  ``"top_k"``: the positions of the ``batch_size`` largest of ``n`` i.i.d. uniforms
    (``lax.top_k``; the same distribution, other draws; ``O(n)`` per call: measured on XLA:CPU 18 us against 170 us
    for the permutation of the 1348 digits).  ``"swap_or_not"``: :func:`swap_or_not` at ``0 .. batch_size - 1``,
    ``O(batch_size)`` per call whatever ``n`` (the 64 of 1348 digits: 8 us, and 16 members under ``vmap`` 50 us
    against 240 us for ``top_k``); distinct by construction, and within :func:`swap_or_not_bound` (1e-6 for
    batches of up to ``n / 4``) of a uniformly random subset in random order.  The config runner uses it.
    Each way a smaller batch is a prefix of a larger one drawn with the same key (for ``top_k`` ties break
    towards the lower index), which is what lets a sweep over batch sizes run as one padded, masked program
    (:func:`batch_fn` with ``max_batch_size``).

    ``n`` and ``batch_size`` are static integers with ``0 <= batch_size <= n < 2^31`` (a larger batch cannot be
    distinct; the indices are ``int32``); anything else is refused with a ``ValueError``."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    # int32 indices: for n >= 2^31 "swap_or_not" overflowed its uint32 arithmetic (no permutation, indices wrapped
    # negative) or failed in a bare OverflowError, "top_k" in lax.top_k's own error
    n = _static_int("sample_indices", "n", n, 0, 2**31 - 1, "an integer in [0, 2^31) (the indices are int32)")
    batch_size = _static_int("sample_indices", "batch_size", batch_size, 0, n,
                             f"an integer in [0, n] = [0, {n}] (distinct indices of the {n} examples)")
    if sampler == "swap_or_not" and n == 0:
        return jnp.zeros((0,), jnp.int32)
    if sampler == "permutation":
        return jax.random.permutation(key, n)[:batch_size].astype(jnp.int32)
    if sampler == "top_k":
        # float32 uniforms whatever jax_enable_x64 says, so that a run draws the same batches with x64 on or off
        return jax.lax.top_k(jax.random.uniform(key, (n,), jnp.float32), batch_size)[1].astype(jnp.int32)
    if sampler == "swap_or_not":
        return _swap_or_not(key, n, jnp.arange(batch_size, dtype=jnp.uint32), swap_or_not_rounds(n))


def batch_fn(dataset: Dataset, batch_size: int | None, *, max_batch_size: int | None = None,
             sampler: str = "permutation") -> Callable[[jax.Array, jax.Array], dict]:
    """A pure ``batch_fn(step, key) -> {"x", "y", "w"}`` for :func:`quotient_sgd.optim.train`.

    The indices are sampled on device from ``key`` inside the scan (the data set is never copied once per step);
    ``step`` is not read: the batch is a function of ``key`` alone (the same key, the same batch), and
    :func:`quotient_sgd.optim.train` passes ``fold_in(key, step)``, so each step draws its own batch.
    ``batch_size=None`` (full batch) returns the whole training set every step.  ``w`` is the per-example weight
    (ones, or a ``0/1`` mask): losses are ``sum(w * l) / sum(w)``.

    Args:
        dataset: the data (its arrays may be tracers of an enclosing ``jit``).
        batch_size: examples per step, or ``None`` for full batch.  May be a traced integer when
            ``max_batch_size`` is given (a batch-size sweep): then ``max_batch_size`` indices are drawn and the
            first ``batch_size`` of them get weight 1.
        max_batch_size: static padded size of the batch (default ``batch_size``); at least a static
            ``batch_size``.  A traced ``batch_size`` above it cannot be checked and weights the whole padded batch.
        sampler: how the indices are drawn (:func:`sample_indices`).

    Example:
        >>> from quotient_sgd.data import teacher_student
        >>> ds = teacher_student(seed=0, n_train=64, n_test=16)
        >>> b = batch_fn(ds, 8)(jnp.int32(0), jax.random.key(0))
        >>> b["x"].shape, b["w"].shape
        ((8, 8), (8,))
    """
    n = dataset.num_train
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if batch_size is None:
        if max_batch_size is not None:
            raise ValueError(f"batch_fn: max_batch_size={max_batch_size!r} needs a batch_size (it pads a sampled "
                             "batch); batch_size=None is the full batch")

        def full(step, key):
            del step, key
            return {"x": dataset.x_train, "y": dataset.y_train, "w": jnp.ones((n,), jnp.float32)}

        return full
    if max_batch_size is None:
        if isinstance(batch_size, jax.core.Tracer):
            raise ValueError("batch_fn: a traced batch_size needs a static max_batch_size (the padded size of the "
                             "batch: max_batch_size indices are drawn and the first batch_size get weight 1)")
        size = _static_int("batch_fn", "batch_size", batch_size, 1, None,
                           "an integer >= 1, or None for the full batch")
    else:
        size = _static_int("batch_fn", "max_batch_size", max_batch_size, 1)
        if not isinstance(batch_size, jax.core.Tracer):
            _static_int("batch_fn", "batch_size", batch_size, 1, size,
                        f"an integer in [1, max_batch_size] = [1, {size}]")
        elif not jnp.issubdtype(jnp.result_type(batch_size), jnp.integer) or jnp.ndim(batch_size) != 0:
            raise ValueError(f"batch_fn: a traced batch_size must be an integer scalar, got {batch_size.aval}")
    if size > n:
        arg, value = ("batch_size", batch_size) if max_batch_size is None else ("max_batch_size", max_batch_size)
        raise ValueError(f"batch_fn: {arg}={value!r} is not allowed; it exceeds the {n} training examples of "
                         f"{dataset.name!r}: need an integer in [1, {n}] (batch_size=None for the full batch)")

    def sample(step, key):
        del step
        idx = sample_indices(key, n, size, sampler)
        if max_batch_size is None:
            w = jnp.ones((size,), jnp.float32)
        else:
            # int32 on both sides whatever jax_enable_x64 says (an int64 arange against the int32 batch size is
            # refused under strict dtype promotion)
            w = (jnp.arange(size, dtype=jnp.int32) < jnp.asarray(batch_size).astype(jnp.int32)).astype(jnp.float32)
        return {"x": dataset.x_train[idx], "y": dataset.y_train[idx], "w": w}

    return sample


def full_batch(dataset: Dataset, split: str = "train") -> dict:
    """The whole train or test split as one batch ``{"x", "y", "w"}``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    x, y = (dataset.x_train, dataset.y_train) if split == "train" else (dataset.x_test, dataset.y_test)
    return {"x": x, "y": y, "w": jnp.ones((x.shape[0],), jnp.float32)}
