"""Reading observables out of a trajectory (a live chunk, a stacked scan output or a saved ``trajectory.npz``)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

# Keys the diagnostics may meet that no observable function registers: metrics of the network function
# (orbit invariants) and the hyperparameters of the step (external, hence unchanged by re-gauging).
_EXTRA_KINDS = {
    "test_loss": "orbit_invariant", "test_accuracy": "orbit_invariant", "train_accuracy": "orbit_invariant",
    "accuracy": "orbit_invariant", "loss": "orbit_invariant", "lr": "external", "learning_rate": "external",
    "step": "external", "gauge_factor_charges": "reduced_dynamics", "lr_times_lambda_step": "reduced_dynamics",
}

#: Aliases: the first key present in a trajectory is used.
SHARPNESS_KEYS = {
    "quotient": ("sharpness_quotient", "hessian_top_quotient"),
    "step": ("sharpness_horizontal", "hessian_top_horizontal"),
    "raw": ("sharpness_raw", "hessian_top_raw"),
    "preconditioned": ("sharpness_preconditioned", "hessian_top_preconditioned"),
}


def kind_of(key: str) -> str:
    """Kind of a (possibly ``"/"``-joined) trajectory key: ``orbit_invariant``, ``reduced_dynamics``, ``raw``
    or ``external``.  Unknown keys count as ``raw`` (never trusted as invariant)."""
    root = key.split("/")[0]
    if root in _EXTRA_KINDS:
        return _EXTRA_KINDS[root]
    try:
        from ..observables import kind_of as _kind_of

        return _kind_of(root)
    except (ImportError, KeyError):
        return "raw"


def is_invariant(keys) -> bool:
    return all(kind_of(k) in ("orbit_invariant", "external") for k in keys)


def real_kind(dtype) -> str:
    """``dtype.kind``, with JAX's extra real dtypes (``ml_dtypes``: ``bfloat16``, the ``float8_*`` types, ``int4``
    / ``uint4``), whose NumPy kind is ``"V"``, read as the floating (``"f"``) or integer (``"i"``, ``"u"``) kind
    they are: a bfloat16 loss was refused as "must hold real numbers"."""
    dtype = np.dtype(dtype)
    if dtype.kind != "V":
        return dtype.kind
    import ml_dtypes

    try:
        ml_dtypes.finfo(dtype)
        return "f"
    except (ValueError, TypeError):
        pass
    try:
        return "i" if ml_dtypes.iinfo(dtype).min < 0 else "u"
    except (ValueError, TypeError):
        return dtype.kind


def plain_scalar(value):
    """A 0-d NumPy or JAX array of a real or boolean dtype (``jnp.int32(5)``, ``np.array(0.9)``, a hyperparameter
    read from an optimiser state) as the Python ``int``, ``float`` or ``bool`` it holds; anything else (Python and
    NumPy scalars, sequences, traced values) as it is.  The argument checks then treat it as that number: a JAX
    scalar was refused where the same NumPy number was accepted, or failed in a bare ``TypeError: unhashable type``
    (:func:`~quotient_sgd.diagnostics.cusum_threshold`'s cache)."""
    if isinstance(value, (np.generic, str, bytes)) or not hasattr(value, "__array__") \
            or getattr(value, "ndim", None) != 0:
        return value
    try:
        a = np.asarray(value)
    except Exception:  # noqa: BLE001 - a traced value: refused by its check as what it is
        return value
    kind = real_kind(a.dtype)
    return bool(a) if kind == "b" else int(a) if kind in "iu" else float(a) if kind == "f" else value


def flatten_trajectory(trajectory: Mapping[str, Any] | Any, where: str = "detect") -> dict[str, np.ndarray]:
    """``{"a": {"b": x}} -> {"a/b": np.asarray(x)}``; a ``np.load``-ed npz is accepted as is.

    Raises:
        TypeError: ``trajectory`` not a mapping (an npz, a NamedTuple): the loss array itself, ``detect(loss)``,
            was reported as a trajectory without a 'loss' key, "got keys ['']" (``where`` names the caller)."""
    if not (isinstance(trajectory, Mapping) or hasattr(trajectory, "files")
            or (isinstance(trajectory, tuple) and hasattr(trajectory, "_fields"))):
        raise TypeError(f"{where}: the trajectory must be a mapping of per-step series, e.g. {{'loss': loss}} (what "
                        f"quotient_sgd.optim.train returns, or a loaded trajectory.npz); got a "
                        f"{type(trajectory).__name__}")
    out: dict[str, np.ndarray] = {}

    def rec(prefix, v):
        if isinstance(v, Mapping) or hasattr(v, "files"):
            keys = v.files if hasattr(v, "files") else list(v.keys())
            for k in keys:
                rec(f"{prefix}/{k}" if prefix else str(k), v[k])
        elif isinstance(v, tuple) and hasattr(v, "_fields"):  # NamedTuple, e.g. Extremes
            for k in v._fields:
                rec(f"{prefix}/{k}" if prefix else k, getattr(v, k))
        else:
            out[prefix] = np.asarray(v)

    rec("", trajectory)
    return out


def num_steps(traj: Mapping[str, np.ndarray]) -> int:
    if "loss" in traj:
        return int(np.asarray(traj["loss"]).shape[0])
    lens = {np.asarray(v).shape[0] for v in traj.values() if np.asarray(v).ndim >= 1}
    if len(lens) != 1:
        raise ValueError(f"cannot tell the number of steps of a trajectory with leading axes {sorted(lens)}")
    return lens.pop()


#: Step numbers are integers of magnitude below this: exact in float64, where the rates divide by step differences.
_MAX_STEP = 2**53


def steps_of(traj: Mapping[str, np.ndarray], start_step: int = 0) -> np.ndarray:
    """The step numbers of the rows: the ``step`` key, else ``start_step + arange(rows)``.

    Raises:
        ValueError: ``step`` values that are not finite integers or not strictly increasing (repeated or unsorted
            steps, e.g. chunks concatenated in the wrong order or twice: every detector reads the rows as
            consecutive in time), or a ``start_step`` that is not an integer (a Python or NumPy integer, or a 0-d
            integer array); steps of magnitude ``2**53`` or more (not exact in float64, where the rates divide by
            the steps between records).
    """
    if "step" in traj:
        raw = np.asarray(traj["step"]).reshape(-1)
        if real_kind(raw.dtype) not in "iuf":
            raise ValueError(f"detect: the trajectory's 'step' key must hold integer step numbers; got dtype "
                             f"{raw.dtype}")
        with np.errstate(invalid="ignore"):
            # NaN (a live chunk without steps), 2.5, +-inf and values past int64 (cast to -2^63, whose difference
            # with the previous step wrapped round to a positive number: read as increasing); from 2^53 on, steps
            # are not exact in float64, where the rates are divided by the steps between records (2^62 + 1 - 2^62
            # was 0: every transition block NaN, none monitored, and a RuntimeWarning)
            bad = np.nonzero((raw != np.round(raw)) | (np.abs(raw) >= _MAX_STEP))[0]
        if bad.size:
            raise ValueError(f"detect: the trajectory's 'step' key must hold integer step numbers (finite, of "
                             f"magnitude < 2**53); got step[{bad[0]}] = {raw[bad[0]]} ({bad.size} such value(s))")
        steps = raw.astype(np.int64)
        back = np.nonzero(np.diff(steps) <= 0)[0]
        if back.size:
            i = int(back[0])
            raise ValueError(f"detect: the trajectory's 'step' key must be strictly increasing (one row per step, "
                             f"in order); step[{i}] = {steps[i]} is followed by step[{i + 1}] = {steps[i + 1]} "
                             f"({back.size} such place(s)). Repeated or unsorted steps come from chunks concatenated "
                             "twice or out of order: sort the rows by step and drop the repeats")
        return steps
    start_step = plain_scalar(start_step)
    n = num_steps(traj)
    # (2**63 failed in a bare OverflowError "Python int too large to convert to C long"; from 2**53 on the steps are
    # not exact in float64, as for the 'step' key)
    if isinstance(start_step, bool) or not isinstance(start_step, (int, np.integer)) \
            or not -_MAX_STEP < int(start_step) <= _MAX_STEP - max(n, 1):
        raise ValueError(f"detect: start_step={start_step!r} is not allowed; need an integer (the first row's step), "
                         f"the steps of the rows of magnitude < 2**53")
    return int(start_step) + np.arange(n, dtype=np.int64)


def scalar(traj: Mapping[str, np.ndarray], key: str) -> np.ndarray | None:
    """The float64 series of a scalar-per-step key (None when absent or not scalar per step).

    Raises:
        ValueError: the key holds something other than real numbers (strings, complex values)."""
    if key not in traj:
        return None
    v = np.asarray(traj[key])
    if v.ndim != 1:
        return None
    if real_kind(v.dtype) not in "biuf":  # strings failed in a bare float conversion, complex lost its imaginary part
        raise ValueError(f"detect: the trajectory's {key!r} key must hold real numbers, one per step; got dtype "
                         f"{v.dtype}")
    return v.astype(np.float64)


def first_key(traj, candidates) -> str | None:
    for k in candidates:
        if k in traj and np.asarray(traj[k]).ndim == 1:
            return k
    return None


def fresh_mask(traj: Mapping[str, np.ndarray], key: str, steps: np.ndarray) -> np.ndarray:
    """Where a periodically refreshed (Hessian) observable holds a new value: the first row at which
    ``hessian_step`` (the step of the refresh, ``-1`` before the first) takes a new value when the trajectory
    records it, else wherever the value is not NaN (NaN marks a step without a refresh; an infinite value is a
    value).  In a trajectory kept every ``K`` steps a refresh between two kept rows is seen at the next one (it
    was dropped unless ``hessian_step`` equalled a kept step: two of every three refreshes with ``K = 10`` and a
    Hessian every 15 steps)."""
    v = np.asarray(traj[key], dtype=np.float64)
    mask = ~np.isnan(v)
    if "hessian_step" in traj:
        hs = np.asarray(traj["hessian_step"], np.float64).reshape(-1)
        hs = np.where(np.isfinite(hs), hs, -1).astype(np.int64)  # NaN: a row without one (live chunks), as -1
        mask &= (hs >= 0) & np.r_[True, hs[1:] != hs[:-1]]
    return mask


def refresh_step(traj: Mapping[str, np.ndarray], i: int, steps: np.ndarray) -> int:
    """The step of the Hessian refresh held at row ``i`` (``hessian_step``, else the row's step)."""
    return int(traj["hessian_step"][i]) if "hessian_step" in traj else int(steps[i])


def check_lr(lr, where: str = "detect") -> np.ndarray:
    """The learning-rate argument as a float64 array of at most one axis, finite and ``>= 0``, else ValueError
    naming it: not real numbers (a string, a bool: ``"0.1"`` was read as 0.1 and ``True`` as 1), more than one
    axis, NaN, infinite or negative."""
    try:
        raw = np.asarray(lr)
    except Exception:  # noqa: BLE001 - not array-like: reported below
        raw = None
    if raw is None or real_kind(raw.dtype) not in "iuf":
        raise ValueError(f"{where}: lr={lr!r} is not allowed; need a number or one value per step (real numbers, "
                         "finite and >= 0; not a string or a bool)")
    arr = raw.astype(np.float64)
    if arr.ndim > 1:
        raise ValueError(f"{where}: lr of shape {arr.shape} is not allowed; need a number or one value per step")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{where}: lr must be finite and >= 0, got {lr!r}")
    return arr


def learning_rate(traj: Mapping[str, np.ndarray], lr, n: int) -> np.ndarray | None:
    """Per-step learning rate from the ``lr`` argument (number or array; finite, >= 0) or the ``lr`` /
    ``learning_rate`` key (one value per step, or a single value for the whole run; real numbers >= 0, NaN where
    a row has none, e.g. a live chunk recorded before the key was: those rows are read without a learning
    rate).

    Raises:
        ValueError: a learning rate that is negative, infinite (or NaN, in the argument), or not real numbers
            (a string or a bool: ``lr="0.1"`` was read as 0.1 and ``lr=True`` as 1), or of another shape."""
    if lr is not None:
        arr = check_lr(lr)
        if arr.ndim == 1 and arr.shape[0] != n:
            raise ValueError(f"detect: lr of shape {arr.shape} is not allowed; need a number or one value per step "
                             f"(shape ({n},))")
        return np.broadcast_to(arr, (n,)).copy()
    for k in ("lr", "learning_rate"):
        if k in traj:
            v = np.asarray(traj[k])
            if real_kind(v.dtype) not in "iuf":  # strings failed in a bare float conversion
                raise ValueError(f"detect: the trajectory's {k!r} key must hold real numbers (the learning rate "
                                 f"of each step); got dtype {v.dtype}")
            v = v.astype(np.float64)
            with np.errstate(invalid="ignore"):
                bad = np.flatnonzero(np.isinf(v) | (v < 0))  # (a 0-d value: the run's constant lr)
            if bad.size:
                # as for the lr argument: eta < 0 with a negative sharpness read as past the edge of stability
                i = int(bad[0])
                raise ValueError(f"detect: the trajectory's {k!r} key must hold learning rates >= 0 (finite, or NaN "
                                 f"for a row without one); got {float(v.reshape(-1)[i])!r} at row {i} "
                                 f"({bad.size} such value(s))")
            if v.size == 1:  # a run's constant learning rate stored once
                return np.full(n, float(v.reshape(())))
            if v.shape != (n,):
                raise ValueError(f"detect: the trajectory's {k!r} key has shape {v.shape}; need one value per "
                                 f"step (shape ({n},)) or a single value")
            return v
    return None


def crossings(values: np.ndarray, level, rearm: float = 0.9) -> list[tuple[int, int, int]]:
    """Episodes of ``values >= level`` with hysteresis: ``(start, end, peak)`` indices, an episode ending when
    the value falls below ``rearm * level``.  ``level``: a number, or one per value (a level that moves along the
    trajectory, e.g. an edge of stability that depends on the step's learning rate).  NaN values are skipped;
    ``+inf`` is above any level (a sharpness or fold number that overflowed)."""
    out = []
    armed = True
    start = peak = -1
    last = -1
    per_value = np.ndim(level) > 0
    # Python floats: the loop over NumPy scalars cost 4.5 us a value (2.7 s on 100000 steps hovering at an edge)
    values = np.asarray(values, np.float64).tolist()
    level = np.asarray(level, np.float64).tolist() if per_value else level
    for i, v in enumerate(values):
        if v != v:  # NaN
            continue
        last = i
        lv = level[i] if per_value else level
        if armed and v >= lv:
            armed, start, peak = False, i, i
        elif not armed:
            if v > values[peak]:
                peak = i
            if v < rearm * lv:
                out.append((start, i, peak))
                armed = True
    if not armed:
        out.append((start, last, peak))
    return out


def above(value, base, factor: float):
    """``value > factor * base`` for a positive ``base``, written ``value - base > (factor - 1) |base|`` so that
    a negative base (a negative log-likelihood) is handled too: ``factor * base`` lies *below* a negative base,
    and a constant negative loss read as a spike at every step."""
    return value - base > (factor - 1.0) * np.abs(base)


def ratio(value, base) -> float:
    """``value / base`` for a positive ``base``; ``1 + (value - base) / |base|`` in general (the size of a spike
    or divergence above a possibly negative base); ``inf`` above a zero base or for a non-finite ``value``."""
    if not np.isfinite(value):  # a spike into a non-finite loss: unbounded (it was reported as NaN)
        return float("inf")
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(1.0 + (value - base) / np.abs(base)) if base != 0 else (float("inf") if value > 0 else 1.0)


def spikes(loss: np.ndarray, factor: float = 2.0, window: int = 50, starts: np.ndarray | None = None,
           steps: np.ndarray | None = None, step_window: int | None = None) -> list[tuple[int, int, int, float]]:
    """Loss spikes: ``(onset, end, peak, base)``, onset where ``loss > factor * base`` with ``base`` the minimum
    of the previous ``window`` losses (:func:`above`, which also holds for a negative base); the spike ends when
    the loss falls back below that level.  A
    non-finite loss is a spike that never ends (see ``divergence``).  A spike also ends ``window`` steps after its
    peak.  ``starts``: the first row of each row's trailing window (:func:`window_starts`, records at irregular
    steps), instead of the previous ``window`` rows, for the base; ``steps`` and ``step_window`` (records at
    irregular steps): the spike ends ``step_window`` steps after its peak, at the first row ``j`` whose previous
    record, covering the steps up to row ``j``'s, starts ``step_window`` or more steps after the peak
    (``steps[j - 1] - steps[peak] >= step_window``: for records every ``K`` steps ``ceil(step_window / K)`` rows
    after it, as ``window``), instead of ``window`` rows after it (rows of the median spacing: a run recorded
    every step for 1000 steps, then every 10, ended a spike of its dense part 5 steps after its peak with a
    50-step window, and one seen live before the sparse rows outnumbered the dense ones 50 steps after it)."""
    out = []
    n = len(loss)
    base_of = trailing_min(loss, window) if starts is None else trailing_min_from(loss, starts)
    with np.errstate(invalid="ignore"):
        onset = np.isfinite(base_of) & (~np.isfinite(loss) | above(loss, base_of, factor))
    cand = np.nonzero(onset)[0]
    cand = cand[cand >= 1]
    by_step = None if steps is None or step_window is None else np.asarray(steps, np.int64).tolist()
    # only the candidate onsets are visited (a Python step per record made a live detector fed one step at a time
    # quadratic in the run's length: 20 ms per update at 2000 steps)
    i = 1
    while i < n:
        k = int(np.searchsorted(cand, i))
        if k == cand.size:
            break
        i = int(cand[k])
        base = float(base_of[i])
        j, peak = i, i
        # the episode ends when the loss is back below factor * base, or ``window`` steps after its peak
        # (a loss that settles at a new, higher level starts a new baseline instead of merging every later
        # spike into this one)
        while j < n and (not np.isfinite(loss[j]) or above(loss[j], base, factor)) and (
                j - peak <= window if by_step is None else by_step[j - 1] - by_step[peak] < step_window):
            if not np.isfinite(loss[j]) or (np.isfinite(loss[peak]) and loss[j] > loss[peak]):
                peak = j
            j += 1
        out.append((i, min(j, n - 1), peak, base))
        i = j + 1
    return out


def trailing_min(x: np.ndarray, window: int) -> np.ndarray:
    """``out[i]`` = the minimum of the finite values among ``x[i - window : i]`` (``+inf`` where there is none;
    ``out[0] = inf``), in O(n) whatever ``window``."""
    from scipy.ndimage import minimum_filter1d

    x = np.where(np.isfinite(x), np.asarray(x, np.float64), np.inf)
    out = np.full(len(x), np.inf)
    if len(x) > 1:
        w = max(1, min(int(window), len(x)))
        # the minimum over x[i - w + 1 : i + 1] (origin shifts scipy's centred window to a trailing one), then one
        # row later
        m = minimum_filter1d(x, size=w, mode="constant", cval=np.inf, origin=(w - 1) // 2)
        out[1:] = m[:-1]
    return out


def irregular_steps(steps) -> np.ndarray | None:
    """``steps`` as int64 when the records are at irregular steps, ``None`` when they are evenly spaced (or fewer
    than two): the windows counted in steps then are a fixed number of records."""
    steps = np.asarray(steps, np.int64)
    d = np.diff(steps)
    return None if d.size == 0 or np.all(d == d[0]) else steps


def window_starts(steps: np.ndarray, window: int) -> np.ndarray | None:
    """For records at irregular steps, the first row of the ``window`` steps before each row: the first row ``j``
    whose record covers a step in ``[steps[i] - window, steps[i])``, a record covering the steps up to the next
    one's (for evenly spaced steps every ``K``, exactly the previous ``ceil(window / K)`` rows).  ``None`` for evenly
    spaced steps (the windows are then a fixed number of records).  A window of the median spacing's records read
    a run recorded every step for 100 steps, then every 100, with a 50-step window of 50 records: 5000 steps of
    its sparse part."""
    steps = irregular_steps(steps)
    if steps is None:
        return None
    # j covers [steps[j], steps[j + 1]): it meets the window when steps[j + 1] > steps[i] - window
    return np.searchsorted(steps[1:], steps - int(window), side="right")


def trailing_min_from(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """``out[i]`` = the minimum of the finite values among ``x[starts[i] : i]`` (``+inf`` where there is none),
    ``starts`` non-decreasing (:func:`window_starts`), in O(n) (a monotone queue)."""
    from collections import deque

    vals = np.where(np.isfinite(x), np.asarray(x, np.float64), np.inf).tolist()
    starts = np.asarray(starts, np.int64).tolist()
    out = [float("inf")] * len(vals)
    q: deque[int] = deque()  # rows before i, their values increasing
    for i, lo in enumerate(starts):
        while q and q[0] < lo:
            q.popleft()
        if q:
            out[i] = vals[q[0]]
        while q and vals[q[-1]] >= vals[i]:
            q.pop()
        q.append(i)
    return np.asarray(out, np.float64)
