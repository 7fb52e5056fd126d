"""Self-starting two-sided CUSUM change-point test with a Monte-Carlo calibrated false-alarm rate.

The statistic (Page 1954; self-starting form after Hawkins 1987): on a series ``x_1, x_2, ...`` (block means of
an observable's increments, see :func:`~quotient_sgd.diagnostics.detect_transition`), with ``mean_{<t}`` and
``std_{<t}`` the sample mean and standard deviation of the values since the last alarm,

    z_t = clip((x_t - mean_{<t}) / std_{<t} * sqrt(n / (n + 1)), -c, c)      (n = values since the last alarm)
    S+_t = max(0, S+_{t-1} + z_t - k),   S-_t = max(0, S-_{t-1} - z_t - k),

monitored once ``n >= min_ref``; an alarm is raised when ``max(S+, S-) > h`` and the test restarts after it.

**Stated false-alarm rate.** ``h`` is the ``1 - alpha`` quantile of ``max_t max(S+_t, S-_t)`` over a sequence of
``n_blocks`` independent Gaussian values, estimated by simulating the identical procedure ``num_sims`` times (at
least ``20 / alpha``).  The procedure is location-scale invariant, so for any stationary series of independent
Gaussian block values,

    P(at least one alarm on a stationary trajectory of n_blocks values) <= alpha   (+ Monte-Carlo error)

The bound assumes independence and Gaussian tails; it is checked on synthetic stationary trajectories in
``tests/test_diagnostics_cusum.py``.  Measured rates at ``alpha = 0.05`` (``detect(kinds=["transition"])`` on a
loss ``exp(c cumsum(e))``, i.e. a loss whose log-rate ``e`` is stationary; 200 series each, s.e. 0.015):

- negatively correlated block values, as in differenced block means of a stationary level (iid, AR(1) up to
  ``phi = 0.99``): 0.000-0.005, conservative;
- AR(1) increments ``e`` (integrated correlation time ``tau = (1 + phi) / (1 - phi)``): ``phi = 0.5``
  (``tau = 3``): 0.125 / 0.070 / 0.065 with blocks of 10 / 30 / 100 steps; ``phi = 0.9`` (``tau = 19``): 0.66-0.85
  / 0.255 / 0.055-0.12.  Blocks longer than ``tau`` are not enough: the rate approaches ``alpha`` once blocks
  are about 5-30 ``tau`` (pass ``block=``);
- iid heavy-tailed or skewed increments (blocks of 10 / 30): Student t2 0.085 / 0.105, t3 0.060 / 0.065,
  exponential 0.075 / 0.045.  On independent block values directly (:func:`cusum`, 20-300 values): exponential
  0.09-0.21, t3 0.06-0.105, Cauchy 0.05-0.12 (the clipping at ``clip`` bounds the damage, it does not remove it).
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import numpy as np

from ._series import plain_scalar, real_kind


class Alarm(NamedTuple):
    """An alarm of :func:`cusum`: indices into the monitored series."""

    index: int  # where the statistic first exceeded the threshold (causal detection time)
    onset: int  # estimated change point: first index after the statistic last left zero
    statistic: float
    direction: int  # +1: mean increased, -1: decreased


def _standardise(x: np.ndarray, n: np.ndarray, s1: np.ndarray, s2: np.ndarray, clip: float,
                 offset=0.0, floor=0.0) -> np.ndarray:
    """``x``, ``s1``, ``s2``: the value and the running sums of values minus ``offset`` (a value of the series near
    its mean), so that ``s2 / n - mean^2`` does not cancel catastrophically for a series with a large level.  The
    standard deviation is at least ``floor`` (see :func:`cusum`'s ``trend_floor``)."""
    mean = s1 / np.maximum(n, 1)
    var = np.maximum(s2 / np.maximum(n, 1) - mean * mean, 0.0) * n / np.maximum(n - 1, 1)
    std = np.maximum(np.sqrt(var), floor)
    tiny = 1e-12 * (np.abs(mean + offset) + 1e-30)
    z = (x - mean) / np.maximum(std, tiny) * np.sqrt(n / (n + 1.0))
    return np.clip(z, -clip, clip)


def _max_statistic(x: np.ndarray, k: float, min_ref: int, clip: float) -> np.ndarray:
    """``max_t max(S+, S-)`` without restarts, vectorised over the leading axis of ``x`` (sims, n)."""
    sims, n = x.shape
    s1 = np.zeros(sims)
    s2 = np.zeros(sims)
    sp = np.zeros(sims)
    sm = np.zeros(sims)
    best = np.zeros(sims)
    for t in range(n):
        if t >= min_ref:
            z = _standardise(x[:, t], np.full(sims, float(t)), s1, s2, clip)
            sp = np.maximum(0.0, sp + z - k)
            sm = np.maximum(0.0, sm - z - k)
            best = np.maximum(best, np.maximum(sp, sm))
        s1 = s1 + x[:, t]
        s2 = s2 + x[:, t] * x[:, t]
    return best


def _check_parameters(fn: str, k, min_ref, clip) -> None:
    """``k`` finite ``>= 0``, ``min_ref`` an integer ``>= 2``, ``clip`` ``> 0`` (``inf``: no clipping), else
    ValueError naming the argument."""
    real = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)  # noqa: E731
    if not (real(k) and np.isfinite(k) and k >= 0):
        raise ValueError(f"{fn}: k={k!r} is not allowed; need a finite number >= 0 (the drift, in standard "
                         "deviations)")
    if not (isinstance(min_ref, numbers.Integral) and not isinstance(min_ref, bool) and min_ref >= 2):
        raise ValueError(f"{fn}: min_ref={min_ref!r} is not allowed; need an integer >= 2 (values before "
                         "monitoring starts: a variance needs two)")
    if not (real(clip) and clip > 0):
        raise ValueError(f"{fn}: clip={clip!r} is not allowed; need a number > 0")


def _check_count(fn: str, name: str, value, low: int, what: str) -> int:
    """``value`` as an int when it is a whole number ``>= low`` (``100.0`` counts), else ValueError naming it: a bool,
    a string or a fraction (``10.5`` was truncated to 10) is not a count."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value) \
        and float(value).is_integer() and value >= low
    if not ok:
        raise ValueError(f"{fn}: {name}={value!r} is not allowed; need an integer >= {low} ({what})")
    return int(value)


#: simulated series exceeding the threshold, at least: below ``alpha = _MIN_EXCEEDANCES / num_sims`` the number of
#: simulations grows as ``_MIN_EXCEEDANCES / alpha``, up to ``_MAX_VALUES`` simulated values in all
_MIN_EXCEEDANCES = 20
_MAX_VALUES = 2**25
#: values simulated at once (rows of ``n_blocks`` values, drawn in order: the same stream as one draw)
_CHUNK_VALUES = 2**22
#: simulated series in the tail an exponential is fitted to, below the smallest alpha the simulations resolve
_TAIL = 1000
#: the longest series simulated; the threshold of a longer one is that of this many blocks at the level that
#: makes ``n_blocks / _MAX_BLOCKS`` independent stretches of it miss with probability ``1 - alpha``
_MAX_BLOCKS = 2**14


def cusum_threshold(n_blocks: int, alpha: float = 0.05, k: float = 0.5, min_ref: int = 10, clip: float = 4.0,
                    num_sims: int = 4000, seed: int = 0) -> float:
    """The threshold ``h`` giving a false-alarm probability ``alpha`` over ``n_blocks`` stationary values.

    Monte-Carlo standard error of the achieved rate: ``sqrt(alpha (1 - alpha) / num_sims)`` (0.0034 at the
    defaults).  At least ``20 / alpha`` series are simulated (more than ``num_sims`` below ``alpha = 0.005``, e.g.
    after :func:`detect_transition`'s split of ``alpha`` over many keys), up to ``2^25`` simulated values (a few
    seconds): with fewer, the quantile is the largest simulated value or near it, and the achieved rate stayed near
    ``1 / num_sims`` however small ``alpha`` (1e-4 measured at ``alpha = 1e-5``).  Below what that many resolve,
    ``h`` extrapolates an exponential fitted to the top 1000 simulated values, ``P(max > h) ~ exp(-theta h)``:
    conservative, the clipped statistic's tail being lighter (measured on 60 blocks: 14.9 for alpha = 1e-5 against
    14.6 from 2 million simulations).  The series are simulated in chunks of at
    most ``max(2^22, 500 n_blocks)`` values (at least 500 series a chunk, the loop over the blocks dominating: 32 MB
    up to 8388 blocks, 80 MB for 20000 blocks, which drew 640 MB at once).  Cached per argument tuple.  Every argument
    may be a Python or NumPy number or a 0-d NumPy / JAX array of one (a JAX scalar failed in the cache with a bare
    ``TypeError: unhashable type``).  A series longer than ``2^14`` blocks is not simulated in full (500 series of
    ``10^6`` blocks drew 4 GB at once and took about ten minutes, ``10^7`` failed in a bare ``MemoryError``): its
    threshold is that of ``N = 2^14`` blocks at the level ``1 - (1 - alpha)^(N / n_blocks)``, i.e. as if the series
    were ``n_blocks / N`` independent stretches of ``N`` blocks (the self-starting test's start-up, where its
    estimates are poorest, counted in each: conservative in that respect; the statistic carried over a stretch's
    start is not).  Measured: 12.80 against 12.89 simulated in full for ``2^16`` blocks at ``alpha = 0.05`` (an
    achieved rate of about 0.054, 1.3 Monte-Carlo standard errors of the quantile), 11.44 / 13.15 from ``4000``
    blocks against 11.45 / 13.13 in full for 16000 blocks at ``alpha = 0.05`` / ``0.01``.

    Raises:
        ValueError: ``n_blocks`` not an integer ``>= 0`` (``10.5`` was simulated as 10 blocks, none monitored, and
            gave the threshold 0), ``alpha`` not in ``(0, 1)``, ``num_sims`` or ``seed`` not an integer ``>= 1`` /
            ``>= 0``, or ``k``,
            ``min_ref``, ``clip`` as in :func:`cusum`.
    """
    n_blocks, alpha, k, min_ref, clip, num_sims, seed = map(plain_scalar, (n_blocks, alpha, k, min_ref, clip,
                                                                          num_sims, seed))
    if not (isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) and 0 < alpha < 1):
        raise ValueError(f"cusum_threshold: alpha={alpha!r} is not allowed; need a number in (0, 1) (the "
                         "false-alarm probability)")
    _check_parameters("cusum_threshold", k, min_ref, clip)
    # a fractional n_blocks (10.5) passed the range test and was simulated as int(10.5) = 10 blocks, none of them
    # monitored: the threshold came out 0, which alarms on every value
    n = _check_count("cusum_threshold", "n_blocks", n_blocks, 0, "the number of block values calibrated for")
    num_sims = _check_count("cusum_threshold", "num_sims", num_sims, 1, "simulated series")
    # (a list failed in the cache's bare "unhashable type"; -1, 1.5 or "a" in NumPy's bare "expected non-negative
    # integer" / "SeedSequence expects int"; True was seed 1 and None a fresh random seed, cached as if fixed)
    if not (isinstance(seed, numbers.Integral) and not isinstance(seed, (bool, np.bool_)) and seed >= 0):
        raise ValueError(f"cusum_threshold: seed={seed!r} is not allowed; need an integer >= 0 (the simulations' "
                         "seed)")
    seed = int(seed)
    return _threshold(n, float(alpha), float(k), int(min_ref), float(clip), num_sims, seed)


@functools.lru_cache(maxsize=256)
def _threshold(n: int, alpha: float, k: float, min_ref: int, clip: float, num_sims: int, seed) -> float:
    """:func:`cusum_threshold` of checked arguments (cached)."""
    if n <= min_ref:
        return float("inf")  # nothing is monitored
    if n > _MAX_BLOCKS:
        # simulated in full, a long series drew 500 series of n values at once (4 GB for 10^6 blocks, a bare
        # MemoryError from 10^7 on) and took minutes to hours: P(no alarm in n) ~ P(no alarm in N)^(n / N)
        return _threshold(_MAX_BLOCKS, float(-np.expm1(np.log1p(-alpha) * _MAX_BLOCKS / n)), k, min_ref, clip,
                          num_sims, seed)
    # (in floats: 20 / alpha overflowed int() for an alpha below 1e-307)
    sims = max(num_sims, int(min(np.ceil(_MIN_EXCEEDANCES / alpha), _MAX_VALUES // n)))
    rows = max(500, _CHUNK_VALUES // n)  # (fewer rows a chunk: the loop over the n blocks dominates)
    rng = np.random.default_rng(seed)
    stats = np.concatenate([_max_statistic(rng.standard_normal((min(rows, sims - i), n)), k, min_ref, clip)
                            for i in range(0, sims, rows)])
    if alpha * sims >= _MIN_EXCEEDANCES:
        return float(np.quantile(stats, 1.0 - alpha))
    q = min(_TAIL, sims) / sims
    u = float(np.quantile(stats, 1.0 - q))
    excess = float(np.mean(stats[stats > u] - u)) if np.any(stats > u) else 0.0
    # (log q - log alpha: q / alpha overflowed to inf for an alpha below 1e-305, and so did the threshold)
    return u + float(np.log(q) - np.log(alpha)) * excess  # excess = 1 / theta, the exponential's maximum likelihood


def cusum(x, *, alpha: float = 0.05, k: float = 0.5, min_ref: int = 10, clip: float = 4.0,
          n_blocks: int | None = None, threshold: float | None = None,
          trend_floor: float = 0.0, relative_floor: float = 0.0) -> list[Alarm]:
    """Run the self-starting CUSUM on the 1-D series ``x`` (non-finite values are skipped).

    Args:
        x: the monitored series (one value per block).
        alpha: false-alarm probability over the trajectory (see the module docstring).
        k: reference value (drift) in standard deviations: the test is tuned to mean shifts of about ``2 k``.
        min_ref: values collected after a (re)start before monitoring begins.
        clip: standardised values are clipped to ``[-clip, clip]`` (robustness to outliers; part of the
            calibrated procedure).
        n_blocks: horizon the threshold is calibrated for, an integer >= 1 (default ``len(x)``; give the planned
            length for live use so that the threshold does not change as chunks arrive).  A horizon shorter than
            the series' finite values is raised to their number (as :func:`detect_transition` does with its
            ``horizon``): the false-alarm bound is over the whole series monitored.
        threshold: override ``h``, a number >= 0 (``inf``: never alarm; 0, the calibrated value at a large
            ``alpha``, alarms whenever the statistic leaves zero); then ``alpha`` is not used.
        trend_floor: a finite number >= 0 (default 0: the noise estimate alone): the values are standardised
            with a standard deviation of at least ``trend_floor`` times the drift a straight line fitted to the
            values since the (re)start predicts for the new value, ``|b| (n + 1) / 2`` (``b`` the least-squares
            slope per value, ``n`` the values), less twice the slope's standard error under the noise estimated
            from successive differences (``sum (x_s - x_{s-1})^2 / (2 (n - 1))``, blind to a smooth trend).  On a
            noiseless series that drifts smoothly the spread is the drift's own, and each new value lies "many
            standard deviations" from the mean of the earlier ones, an alarm every 10-20 values; with the floor a
            value that continues the trend gives ``|z| ~ 1 / trend_floor`` (below ``k`` from ``trend_floor > 1 /
            k``) while a break of the trend (a rate that jumps or stops) stands out against the trend's own
            scale, not against the series' magnitude.  On a series without a significant trend the floor is 0 and
            the test the calibrated one; elsewhere it only shrinks the standardised values, with the threshold
            calibrated without it.
        relative_floor: a finite number >= 0 (default 0): the standard deviation is also at least
            ``relative_floor * |mean_{<t}|``, the running mean's magnitude.  For a series whose origin means
            something, a *rate* (0: nothing changes), a deviation within ``k * relative_floor`` of the rate itself
            is not a change, whatever the noise (a noiseless rate that starts to drift after a constant stretch:
            there the trend is not yet significant and the spread is rounding).  Not for a series measured from an
            arbitrary origin (a level): the test would no longer be location invariant.

    Returns:
        A list of :class:`Alarm`, in time order.

    Raises:
        ValueError: ``x`` not a 1-D series of real numbers (a ``(steps, k)`` array was flattened row by row, its
            columns interleaved into one series), ``k`` not a finite number ``>= 0`` (a negative drift alarms on
            any series), ``min_ref`` not an integer ``>= 2``, ``clip`` not a number ``> 0``, ``n_blocks`` not an
            integer ``>= 1`` or ``None``, ``threshold`` not a number ``>= 0`` or ``None`` (a NaN threshold never
            alarmed, a negative one alarmed on every value, a horizon below ``min_ref`` such as ``n_blocks=5``
            gave an infinite threshold for a series of any length: each without a word), ``trend_floor`` or
            ``relative_floor`` not a finite number ``>= 0``.
    """
    x = np.asarray(x)
    alpha, k, min_ref, clip, n_blocks, threshold = map(plain_scalar, (alpha, k, min_ref, clip, n_blocks, threshold))
    if x.ndim != 1 or real_kind(x.dtype) not in "biuf":
        raise ValueError(f"cusum: x must be a 1-D series of real numbers (one value per block); got shape {x.shape}, "
                         f"dtype {x.dtype}")
    _check_parameters("cusum", k, min_ref, clip)
    if threshold is None and not (isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) and 0 < alpha < 1):
        raise ValueError(f"cusum: alpha={alpha!r} is not allowed; need a number in (0, 1) (the false-alarm "
                         "probability)")
    if n_blocks is not None:
        n_blocks = _check_count("cusum", "n_blocks", n_blocks, 1, "the planned number of values, or None")
    if threshold is not None and not (isinstance(threshold, numbers.Real) and not isinstance(threshold, bool)
                                      and threshold >= 0):  # (NaN >= 0 is False)
        raise ValueError(f"cusum: threshold={threshold!r} is not allowed; need a number >= 0 (inf: never alarm) or "
                         "None (calibrated from alpha)")
    trend_floor = _check_floor("trend_floor", trend_floor, "the drift of the values' trend")
    relative_floor = _check_floor("relative_floor", relative_floor, "the running mean's magnitude")
    x = x.astype(np.float64)
    idx = np.nonzero(np.isfinite(x))[0]
    xs = x[idx]
    h = threshold if threshold is not None else cusum_threshold(max(n_blocks or 0, len(xs)), alpha, k, min_ref, clip)
    alarms: list[Alarm] = []
    n = 0
    s1 = s2 = sp = sm = 0.0
    sxy = sd2 = prev = 0.0  # sum of index * value, sum of squared successive differences, the last value
    zero_p = zero_m = 0
    # sums of the values minus the first one since the (re)start: the one-pass variance of the raw values
    # cancels catastrophically when the level is large against the spread (a level 1e8 with unit noise gave
    # false alarms on 96% of stationary series), and the procedure is meant to be location invariant
    shift = 0.0
    for t, v in enumerate(xs):
        if n == 0:
            shift = float(v)
        if n >= min_ref:
            floor = trend_floor * _trend_drift(n, s1, sxy, sd2) if trend_floor > 0 else 0.0
            floor = max(floor, relative_floor * abs(s1 / n + shift))
            z = float(_standardise(np.asarray(v - shift), np.asarray(float(n)), np.asarray(s1), np.asarray(s2),
                                   clip, shift, floor))
            sp = max(0.0, sp + z - k)
            sm = max(0.0, sm - z - k)
            if sp == 0.0:
                zero_p = t + 1
            if sm == 0.0:
                zero_m = t + 1
            if max(sp, sm) > h:
                up = sp >= sm
                onset = zero_p if up else zero_m
                alarms.append(Alarm(int(idx[t]), int(idx[min(onset, t)]), float(max(sp, sm)), 1 if up else -1))
                n = 0
                s1 = s2 = sp = sm = sxy = sd2 = 0.0
                zero_p = zero_m = t + 1
                continue
        else:
            zero_p = zero_m = t + 1
        y = v - shift
        if n > 0:
            sd2 += (y - prev) * (y - prev)
        sxy += n * y
        prev = y
        n += 1
        s1 += y
        s2 += y * y
    return alarms


def _check_floor(name: str, value, what: str) -> float:
    """``value`` (a number or a 0-d array of one) as a float when it is finite and ``>= 0``, else ValueError naming
    ``name``."""
    v = plain_scalar(value)
    if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(v) and v >= 0):
        raise ValueError(f"cusum: {name}={value!r} is not allowed; need a finite number >= 0 (the noise floor as a "
                         f"multiple of {what}; 0: none)")
    return float(v)


def _trend_drift(n: int, s1: float, sxy: float, sd2: float) -> float:
    """The drift from their mean that the least-squares line through ``n`` values (indices ``0..n-1``; sums
    ``s1`` of the values, ``sxy`` of index times value, ``sd2`` of squared successive differences) predicts for
    the next value, ``|b| (n + 1) / 2``, with ``|b|`` less twice its standard error under the difference-based
    noise estimate (0 when the slope is not significant)."""
    sxx = n * (n * n - 1) / 12.0
    b = (sxy - 0.5 * (n - 1) * s1) / sxx
    noise = np.sqrt(sd2 / (2.0 * (n - 1)))
    return max(0.0, abs(b) - 2.0 * noise / np.sqrt(sxx)) * (n + 1) / 2.0
