"""Phase-transition detectors on quotient trajectories (THEORY sections 3-4).

Every detector is a pure host-side function ``trajectory -> list[Event]``.  The trajectory is a dict of per-step
arrays (leading axis = step) with the keys of :func:`quotient_sgd.optim.quotient_trajectory` (``loss``,
``shock_number``, ``fold_number``, ``sharpness_quotient`` / ``sharpness_horizontal`` / ``sharpness_raw``,
``grad_norm_canonical``, ``invariant_norms``, ...); Hessian keys may be refreshed every few steps (marked by
``hessian_step`` or NaN in between).  Missing keys switch the corresponding detector off.

Variants (THEORY section 4): ``quotient`` events read orbit invariants only and are identical on a trajectory and
its re-gauged copy; ``step`` events read what the optimiser step sees (reduced dynamics) and carry the
decomposition ``lr * lambda_step = lr * lambda_canonical * gauge_factor`` so that "the function became sharp"
(``lambda_canonical``) is told from "the parameterisation became unbalanced" (``gauge_factor``); ``raw`` events
read raw norms / sharpness, for comparison only.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ._cusum import cusum, cusum_threshold
from ._events import Event
from ._options import _levels, check_kinds, check_options, number
from ._series import (
    SHARPNESS_KEYS,
    above,
    check_lr,
    crossings,
    first_key,
    flatten_trajectory,
    fresh_mask,
    irregular_steps,
    is_invariant,
    kind_of,
    learning_rate,
    ratio,
    real_kind,
    refresh_step,
    scalar,
    spikes,
    steps_of,
    window_starts,
)

ALL_KINDS = ("divergence", "shock", "fold", "edge_of_stability", "loss_spike", "catapult", "transition")


def _f(x) -> float:
    return float(np.asarray(x))


def _sharpness_keys(traj) -> tuple[str | None, str | None, str | None]:
    """The trajectory's step, quotient and raw sharpness keys (``None`` where absent); the first present one
    anchors the stability decomposition."""
    return tuple(first_key(traj, SHARPNESS_KEYS[v]) for v in ("step", "quotient", "raw"))


def _decomposition_rows(traj, steps) -> np.ndarray | None:
    """The rows holding a fresh Hessian refresh of the decomposition's anchor key (the step sharpness, else the
    quotient, else the raw one), in order; ``None`` without any sharpness key.  Computed once per detector call and
    passed to :func:`_decomposition` for each event: computed per event, a long run with many events took time
    quadratic in its length (100000 steps hovering at the edge of stability: 8.5 s for ``edge_of_stability``, 56 s
    at 200000 steps)."""
    anchor = next((k for k in _sharpness_keys(traj) if k is not None), None)
    if anchor is None:
        return None
    return np.nonzero(fresh_mask(traj, anchor, np.asarray(steps)))[0]


def _row_of(steps: np.ndarray, step: int) -> int:
    """The row of ``step`` in the strictly increasing ``steps`` (checked by :func:`steps_of`), by bisection: a
    comparison with every row, per event, made the detectors quadratic in the run's length."""
    return int(np.searchsorted(steps, step))


def _decomposition(traj, i: int, lr_i: float | None, steps=None, rows: np.ndarray | None = None) -> dict[str, float]:
    """The stability decomposition at the last Hessian refresh at or before index ``i`` (``at_step``).  ``rows``:
    :func:`_decomposition_rows` of the trajectory, when already computed."""
    out: dict[str, float] = {}
    ks, kq, kr = _sharpness_keys(traj)
    anchor = ks or kq or kr
    if anchor is None:
        return out
    if steps is None:
        steps = traj["step"] if "step" in traj else np.arange(len(traj[anchor]))
    fresh = _decomposition_rows(traj, steps) if rows is None else rows
    k = int(np.searchsorted(fresh, i, side="right"))  # refreshes at or before row i
    if k == 0:
        return out
    i = int(fresh[k - 1])
    out["at_step"] = refresh_step(traj, i, steps)
    if ks is not None:
        out["lambda_step"] = _f(traj[ks][i])
    if kq is not None:
        out["lambda_canonical"] = _f(traj[kq][i])
    if kr is not None:
        out["lambda_raw"] = _f(traj[kr][i])
    if ks is not None and kq is not None and out["lambda_canonical"] != 0:
        out["gauge_factor"] = out["lambda_step"] / out["lambda_canonical"]
    if "gauge_factor_charges" in traj and np.asarray(traj["gauge_factor_charges"]).ndim == 1:
        out["gauge_factor_charges"] = _f(traj["gauge_factor_charges"][i])
    if lr_i is not None:
        for k in ("lambda_step", "lambda_canonical", "lambda_raw"):
            if k in out:
                out["lr_times_" + k] = lr_i * out[k]
    return out


# ----------------------------------------------------------------------------------------------------------------
def _records(window: int, steps) -> int:
    """A window of ``window`` *steps* in records of a trajectory recorded at ``steps`` (every ``K`` steps: the
    median spacing; at least one record)."""
    steps = np.asarray(steps)
    stride = float(np.median(np.diff(steps))) if steps.size > 1 else 1.0
    return max(1, int(np.ceil(window / stride))) if stride > 1 else max(1, int(window))


def _lr_of_rows(lr, steps) -> np.ndarray | None:
    """``lr`` as :func:`detect` passes it to the per-kind detectors, one float per row (or ``None``): a number, a
    0-d array or one value per row given to a ``detect_*`` function directly is checked and broadcast as
    :func:`detect` does (``detect_edge_of_stability(traj, steps=..., lr=0.1)`` failed in a bare "'float' object is
    not subscriptable", ``detect_shock``'s slice shocks in "'float' object has no attribute 'size'")."""
    n = len(steps)
    if lr is None or (isinstance(lr, np.ndarray) and lr.dtype == np.float64 and lr.shape == (n,)):
        return lr  # (detect's own: NaN marks a row without one, which check_lr would refuse)
    return learning_rate({}, lr, n)


def detect_divergence(traj, *, steps, divergence_factor: float = 100.0, divergence_patience: int = 20,
                      **_) -> list[Event]:
    """First step where the loss is non-finite, or where it has exceeded ``divergence_factor`` times the initial
    loss for ``divergence_patience`` consecutive steps (a catapult's transient spike is not a divergence; the
    event's step is the first of those steps).  A negative initial loss ``l0`` must be exceeded by
    ``(divergence_factor - 1) |l0|`` (``factor * l0`` lies below it: a constant negative loss diverged at step 0);
    an initial loss of exactly 0 is no scale: only a non-finite loss is a divergence then.
    Records kept every few steps, evenly or not, count the steps they cover, back to the previous record (the
    steps since it, what is known at the record: live chunks give the events of the whole run): ``m`` high records
    kept every ``K`` steps are ``m K`` steps.  (Counted up to the *next* record, with the spacing before it for the
    last one, a live chunk that ended at a high record every 10 steps, followed by records every step, counted it
    10 steps where the whole run counts 1: records at steps 180 and 190 high, 191 not, a divergence live that the
    whole run did not have.)"""
    loss = scalar(traj, "loss")
    if loss is None or loss.size == 0:
        return []
    l0 = loss[0] if np.isfinite(loss[0]) else np.inf
    nonfinite = ~np.isfinite(loss)
    with np.errstate(invalid="ignore"):
        high = np.where(nonfinite | (l0 == 0), False, above(loss, l0, divergence_factor))
    # the steps a run of high records spans, each record covering the steps since the previous one's: for records
    # every K steps, m records span m K steps.  With a patience of the median spacing's records, a run recorded
    # every step for 100 steps, then every 100, that stayed 1000 x its initial loss for its last 1000 steps (11
    # records) was no divergence: 20 records were asked for.  (Row 0 holds l0, never high: a run starts at row 1
    # or later, after a previous record.)
    steps = np.asarray(steps, np.int64)
    n = len(loss)
    cover_start = np.r_[steps[0] - 1, steps[:-1]]  # (exclusive)
    run_start = np.maximum.accumulate(np.where(high & ~np.r_[False, high[:-1]], np.arange(n), 0))
    sustained = np.nonzero(high & (steps - cover_start[run_start] >= int(divergence_patience)))[0]
    cands = []
    if nonfinite.any():
        cands.append(int(np.argmax(nonfinite)))
    if sustained.size:
        cands.append(int(run_start[sustained[0]]))  # the first of those steps
    if not cands:
        return []
    i = min(cands)
    strength = ratio(loss[i], l0) if np.isfinite(loss[i]) else float("inf")
    return [Event(int(steps[i]), "divergence", strength, {"loss": _f(loss[i])}, "quotient", True,
                  {"initial_loss": _f(l0), "factor": divergence_factor})]


def _threshold_events(traj, key: str, values: np.ndarray, idx: np.ndarray, steps, kind: str, level,
                      variant: str, rearm: float, lr: np.ndarray | None, extra_keys=()) -> list[Event]:
    """Crossings of ``values`` (rows ``idx``) over ``level``: a number, or one per row (a level that moves with
    the step's learning rate); ``details["level"]`` is the level of the crossing's row."""
    out = []
    per_row = np.ndim(level) > 0
    rows = _decomposition_rows(traj, steps) if variant == "step" else None  # (once, not per event)
    for s, _e, p in crossings(values[idx], np.asarray(level)[idx] if per_row else level, rearm):
        i, ip = int(idx[s]), int(idx[p])
        obs = {key: _f(values[i])}
        for k in extra_keys:
            if k in traj and np.asarray(traj[k]).ndim == 1:
                obs[k] = _f(traj[k][i])
        details: dict[str, Any] = {"level": float(level[i]) if per_row else level, "peak": _f(values[ip]),
                                   "peak_step": int(steps[ip])}
        if key.endswith("_hessian"):
            # told apart from the per-step number's event at the same step and level (Event.key, live detection)
            details["observable"] = key
        if variant == "step":
            details.update(_decomposition(traj, i, None if lr is None else float(lr[i]), steps, rows))
        out.append(Event(int(steps[i]), kind, _f(values[i]), obs, variant, is_invariant(obs), details))
    return out


def _step_and_hessian_numbers(traj, name, steps):
    """``(key, values, rows read)`` for the per-step number ``name`` (rows where it is recorded) and for
    ``name + "_hessian"`` (the rows where the Hessian was refreshed), for those of the two the trajectory holds."""
    out = []
    for key in (name, name + "_hessian"):
        v = scalar(traj, key)
        if v is not None:
            read = fresh_mask(traj, key, steps) if key.endswith("hessian") else ~np.isnan(v)
            out.append((key, v, np.nonzero(read)[0]))
    return out


def detect_shock(traj, *, steps, lr=None, shock_level: float = 1.0, rearm: float = 0.9, slice_shocks=(), **_):
    """``shock``: the shock number ``eta max(0, -kappa)`` of the step (directional curvature along the step; in
    the trajectory of :func:`~quotient_sgd.optim.quotient_trajectory` row ``k`` holds the number of step
    ``k - 1``) or
    ``eta max(0, -lambda_min)`` of the horizontal Hessian (``shock_number_hessian``) reaching ``shock_level``:
    characteristics of the coarse-grained flow cross within one step (THEORY section 3).  ``slice_shocks``: shocks
    found by the HJ flow on a loss slice, ``[{"step", "shock_time", "lr" (optional), ...}]`` (an integer step, a
    shock time > 0; numbers or 0-d arrays, e.g. ``SliceFlow.shock_time``), reported as variant ``"slice"`` events
    with ``strength = lr / shock_time`` (a step of size ``lr`` reaches the shock; without the entry's ``lr``, the
    learning rate of its step), the other entries in ``details``."""
    lr = _lr_of_rows(lr, steps)
    out = []
    for key, v, idx in _step_and_hessian_numbers(traj, "shock_number", steps):
        out += _threshold_events(traj, key, v, idx, steps, "shock", shock_level, "step", rearm, lr, ("curvature",))
    for sh in slice_shocks:
        # (numbers or 0-d arrays of them, as check_options let through: shock_time's own 0-d JAX array)
        t, step = number(sh["shock_time"]), int(number(sh["step"]))
        # without its own ``lr`` a slice shock is reached by the step size at its step (the last recorded step at
        # or before it; ``lr[0]`` was used whatever the schedule)
        at = max(0, int(np.searchsorted(steps, step, side="right")) - 1)
        eta = number(sh["lr"]) if "lr" in sh else (np.nan if lr is None or lr.size == 0 else float(lr[at]))
        details = {k: (number(v) if k in ("shock_time", "lr") else v) for k, v in sh.items() if k != "step"}
        out.append(Event(step, "shock", eta / t if t > 0 else float("inf"),
                         {"shock_time": t}, "slice", False, details))
    return out


def _check_decay(fn: str, decay, bound: float, what: str) -> float:
    """``decay`` (``eta * weight_decay`` of SGD's coupled decay; a number or a 0-d array of one) as a float in
    ``[0, bound)``, else ValueError."""
    d = _real_scalar(decay)
    ok = d is not None and 0 <= d < bound
    if not ok:
        raise ValueError(f"{fn}: decay={decay!r} is not allowed; need a number in [0, {bound!r}) (SGD's coupled "
                         f"weight decay times the learning rate, eta * weight_decay; from {bound!r} on the decay "
                         f"alone, on a mode of zero curvature, {what})")
    return d


def _real_scalar(value) -> float | None:
    """``value`` as a float when it is a real number: a Python or NumPy number, or a concrete 0-d NumPy / JAX
    array of an integer or floating dtype (the momentum read from an optimiser state); else ``None`` (a bool, a
    string, an array of another shape or dtype, a traced value)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    try:
        a = np.asarray(value)
    except Exception:  # (a traced value, an object NumPy cannot read)
        return None
    if a.ndim == 0 and real_kind(a.dtype) in "iuf":  # (bfloat16 too, whose NumPy kind is "V")
        return float(a)
    return None


def _check_momentum(fn: str, momentum, nesterov) -> float:
    """``momentum`` (SGD's ``beta``: a number, or a 0-d array of one) as a float in ``[0, 1)`` and ``nesterov`` a
    bool, else ValueError: at ``beta = 1`` the momentum iteration is never stable (the product of its roots is
    ``beta``)."""
    b = _real_scalar(momentum)
    ok = b is not None and 0 <= b < 1
    if not ok:
        raise ValueError(f"{fn}: momentum={momentum!r} is not allowed; need a number in [0, 1) (SGD's momentum "
                         f"beta; from 1 on the momentum iteration is unstable at every curvature)")
    if not isinstance(nesterov, (bool, np.bool_)):
        raise ValueError(f"{fn}: nesterov={nesterov!r} is not allowed; need True or False")
    return b


def stability_edge(momentum: float = 0.0, nesterov: bool = False, *, decay: float = 0.0) -> float:
    """The value of ``eta * lambda`` at which SGD with momentum ``beta`` (optax's form: ``m+ = beta m + g``, step
    ``-eta m+``, or ``-eta (g + beta m+)`` with ``nesterov``) turns unstable on a quadratic of curvature
    ``lambda``: ``2 (1 + beta)`` for heavy ball, ``2 (1 + beta) / (1 + 2 beta)`` for Nesterov, ``2`` without
    momentum (the roots of ``z^2 - (1 + beta - eta lambda) z + beta = 0``, resp. of Nesterov's recursion, leave the
    unit disc there).

    ``decay``: SGD's coupled weight decay as the product ``eta * weight_decay`` of the step
    (``optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(eta, momentum, nesterov))``: the term
    ``weight_decay * theta`` is added to the gradient before the momentum trace, an L2 term of the gradient that is
    not part of the loss).  On a mode of curvature ``lambda`` of the *loss* Hessian the step map is the one
    without decay at curvature ``lambda + weight_decay``, so the edge moves to ``eta lambda = stability_edge(beta,
    nesterov) - decay``.

    Raises:
        ValueError: ``momentum`` not a number in ``[0, 1)``, ``nesterov`` not a bool, ``decay`` not a number in
            ``[0, stability_edge(beta, nesterov))`` (from there on the decay alone is unstable: even ``lambda = 0``
            is at or past the edge).
    """
    b = _check_momentum("stability_edge", momentum, nesterov)
    edge = 2 * (1 + b) / (1 + 2 * b) if nesterov else 2 * (1 + b)
    return edge - _check_decay("stability_edge", decay, edge, "the step map is unstable")


def adam_edge(b1: float = 0.9, *, decay: float = 0.0, nesterov: bool = False) -> float:
    """The value of ``eta * lambda`` at which Adam with first-moment decay ``b1`` turns unstable on a quadratic,
    ``lambda`` an eigenvalue of the *preconditioned* Hessian ``P^-1 H`` (Cohen et al. 2022): ``2 (1 + b1) /
    (1 - b1)``, 38 for ``b1 = 0.9``, 2 for ``b1 = 0`` (RMSProp).

    With ``P = (1 - b1^t) (sqrt(v_hat) + eps)`` frozen (:func:`quotient_sgd.optim.adam_preconditioner`), Adam's step
    ``theta -> theta - eta P^-1 m``, ``m -> b1 m + (1 - b1) g``, is EMA momentum; on a mode ``a`` of
    ``P^-1/2 H P^-1/2`` its linear map has the characteristic polynomial ``z^2 - (1 + b1 - eta a (1 - b1)) z + b1``,
    whose roots leave the unit disc through ``-1`` at ``eta a (1 - b1) = 2 (1 + b1)`` (heavy ball's
    :func:`stability_edge` with the gradient scaled by ``1 - b1``).

    ``decay``: AdamW's decoupled weight decay as the product ``eta * weight_decay`` of the step
    (``optax.adamw``: ``theta -> theta - eta (m_hat / (sqrt(v_hat) + eps) + weight_decay theta)``, with no mask:
    the same decay on every parameter, so that it stays ``decay * identity`` in the whitened coordinates
    ``P^1/2 theta``).  The map of a mode becomes ``u+ = (1 - decay - eta (1 - b1) a) u - eta b1 z``,
    ``z+ = (1 - b1) a u + b1 z`` (``u = P^1/2 theta``, ``z = P^-1/2 m``), with characteristic polynomial ``z^2 -
    (1 + b1 - decay - eta a (1 - b1)) z + b1 (1 - decay)``; its roots leave the unit disc through ``-1`` at
    ``eta a = (2 - decay) (1 + b1) / (1 - b1)``.  A complex pair has modulus ``sqrt(b1 |1 - decay|) < 1`` and the
    polynomial is ``(1 - b1) (decay + eta a) > 0`` at ``+1``, so for ``a >= 0`` this is the only way out.

    ``nesterov``: Nesterov Adam (``optax.adam`` / ``adamw(..., nesterov=True)``, ``optax.nadam`` / ``nadamw``), whose
    step divides ``b1 m+ + (1 - b1) g`` (each bias-corrected) instead of ``m+`` by ``P``.  Once the bias correction
    has settled (``b1^t`` small) a mode follows ``u+ = (1 - decay - eta (1 - b1^2) a) u - eta b1^2 z``,
    ``z+ = (1 - b1) a u + b1 z``, with characteristic polynomial ``z^2 - (1 + b1 - decay - (1 + b1) k) z +
    b1 (1 - decay - k)``, ``k = eta a (1 - b1)``: the roots leave through ``-1`` at ``eta a = (2 - decay) (1 + b1) /
    ((1 - b1) (1 + 2 b1))`` (13.57 for ``b1 = 0.9``: Nesterov's :func:`stability_edge` with the gradient scaled by
    ``1 - b1``); below it ``|b1 (1 - decay - k)| < 1`` and the value at ``+1``, ``(1 - b1) decay + k``, is
    positive, so no root leaves elsewhere.

    Raises:
        ValueError: ``b1`` not a number in ``[0, 1)``, ``decay`` not a number in ``[0, 2)`` (from ``decay = 2`` on
            the decay alone, ``theta -> (1 - decay) theta``, is unstable: no ``a >= 0`` is stable), ``nesterov`` not
            a bool.
    """
    b, d = _real_scalar(b1), _real_scalar(decay)  # (a 0-d array, e.g. b1 read from an optimiser state, counts)
    if b is None or not 0 <= b < 1:
        raise ValueError(f"adam_edge: b1={b1!r} is not allowed; need a number in [0, 1) (Adam's first-moment decay)")
    if d is None or not 0 <= d < 2:
        raise ValueError(f"adam_edge: decay={decay!r} is not allowed; need a number in [0, 2) (AdamW's decoupled "
                         f"weight decay times the learning rate, eta * weight_decay)")
    if not isinstance(nesterov, (bool, np.bool_)):
        raise ValueError(f"adam_edge: nesterov={nesterov!r} is not allowed; need True or False (Nesterov Adam)")
    edge = (2 - d) * (1 + b) / (1 - b)
    return edge / (1 + 2 * b) if nesterov else edge


def fold_edge(momentum: float = 0.0, nesterov: bool = False, *, decay: float = 0.0) -> float:
    """The value of ``eta * lambda`` at which SGD with momentum ``beta`` (optax's form, as in
    :func:`stability_edge`) folds on a quadratic of curvature ``lambda``: an eigenvalue of its linear step map
    reaches the left half-plane, so the iterate overshoots the minimum (for a real eigenvalue, flips side every
    step; for a complex pair, turns by more than a quarter turn a step), half-way to the instability.

    - Gradient descent: ``1``; the eigenvalue ``1 - eta lambda`` crosses 0 and the step map ``x -> x - eta grad
      L`` itself folds (its Jacobian turns singular): THEORY section 4's fold.
    - Nesterov: ``1`` as well; the roots of ``z^2 - (1 + beta)(1 - eta lambda) z + beta (1 - eta lambda)`` both
      pass through 0 there, and the step map's Jacobian (determinant ``beta (1 - eta lambda)``) turns singular:
      it folds in THEORY's sense.
    - Heavy ball: ``1 + beta``, half its edge ``2 (1 + beta)``; the roots of ``z^2 - (1 + beta - eta lambda) z +
      beta`` are complex there with real part ``(1 + beta - eta lambda) / 2``.  Its step map never turns
      singular (determinant ``beta``), so this overshoot is the fold's counterpart, not a fold of the map.

    (The roots of either momentum iteration are complex, the iterate spiralling in, from a far smaller
    ``eta lambda``, ``(1 - sqrt(beta))^2`` for heavy ball: the normal regime of momentum, not a transition.)

    ``decay``: SGD's coupled weight decay ``eta * weight_decay``, as in :func:`stability_edge` (the curvature
    the step sees is ``lambda + weight_decay``): the fold moves to ``eta lambda = fold_edge(beta, nesterov) -
    decay``, ``lambda`` of the loss Hessian.

    Raises:
        ValueError: ``momentum`` not a number in ``[0, 1)``, ``nesterov`` not a bool, ``decay`` not a number in
            ``[0, fold_edge(beta, nesterov))`` (from there on the decay alone folds the step map: every mode, even
            ``lambda = 0``, overshoots)."""
    b = _check_momentum("fold_edge", momentum, nesterov)
    fold = 1.0 if nesterov else 1.0 + b
    return fold - _check_decay("fold_edge", decay, fold, "the step map overshoots (folds)")


def fold_levels_for(levels: Sequence[float], momentum: float = 0.0, nesterov: bool = False, *,
                    decay: float = 0.0) -> list[float]:
    """``fold_levels`` given on gradient descent's scale (1: the step map folds, 2: unstable) mapped to SGD with
    momentum ``beta`` and coupled weight decay ``decay = eta * weight_decay``, in ``eta * lambda`` of the loss:
    piecewise linear through ``0 -> 0``, ``1 -> fold_edge(beta, nesterov, decay=decay)`` and
    ``2 -> stability_edge(beta, nesterov, decay=decay)``, and ``x -> x * stability_edge / 2`` above 2 (the scaling
    of :func:`detect_edge_of_stability`).  The identity without momentum and decay.

    Raises:
        ValueError: ``levels`` not a non-empty sequence of finite numbers ``> 0`` (as ``detect``'s ``fold_levels``
            option: a string ``"12"`` was read as its characters, the levels 1 and 2, and NaN or negative levels
            were mapped as they came), ``momentum`` not in ``[0, 1)``, ``nesterov`` not a bool, ``decay`` not in
            ``[0, fold_edge(beta, nesterov))`` (no fold level: see :func:`fold_edge`).
    """
    if not isinstance(levels, (str, bytes)) and hasattr(levels, "__iter__") and iter(levels) is levels:
        levels = tuple(levels)  # a generator: checked, it was consumed and mapped to []
    if not _levels(levels):
        raise ValueError(f"fold_levels_for: levels={levels!r} is not allowed; need a non-empty sequence of finite "
                         "numbers > 0 on gradient descent's scale, e.g. (1.0, 2.0)")
    f, e = fold_edge(momentum, nesterov, decay=decay), stability_edge(momentum, nesterov, decay=decay)
    out = []
    for x in levels:
        x = float(x)
        out.append(float(x * f if x <= 1 else (f + (x - 1) * (e - f) if x <= 2 else x * e / 2)))
    return out


def _distinct_levels(levels) -> list[float]:
    """``levels`` as floats without repeats, in their order: a level given twice (``(2.0, 2.0)``, ``(2, 2.0)``)
    reported each of its crossings twice."""
    return list(dict.fromkeys(float(x) for x in levels))


def _decay_of_rows(lr, weight_decay, idx, steps, bound: float, need: str, why: str) -> np.ndarray:
    """The decay ``lr * weight_decay`` of each row (the learning rate of the row: a level moves with a schedule),
    checked below ``bound`` at the rows ``idx`` that are read; the error says ``need < {need}`` and ``why``."""
    decay = np.asarray(lr, np.float64) * float(weight_decay)
    bad = idx[decay[idx] >= bound]
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"detect: lr * weight_decay = {float(decay[i])!r} at step {int(steps[i])} (lr={_f(lr[i])!r}, "
                         f"weight_decay={weight_decay!r}) is not allowed; need < {need} ({why})")
    return decay


def _coupled_decay(lr, weight_decay, idx, steps, bound: float, bound_text: str, what: str) -> np.ndarray:
    """SGD's coupled weight decay ``lr * weight_decay`` of each row, checked below ``bound``
    (:func:`_decay_of_rows`)."""
    return _decay_of_rows(lr, weight_decay, idx, steps, bound, f"{bound_text} = {bound!r} for {what}",
                          "SGD's coupled decay, optax.add_decayed_weights before the momentum, adds weight_decay to "
                          "every curvature: from there on the decay alone, at zero curvature of the loss, is past it")


def _lr_of_described_steps(lr: np.ndarray, steps: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The learning rate of the step each row's per-step ``curvature`` / ``shock_number`` / ``fold_number``
    ``values`` describe: recorded at step ``k`` it is step ``k - 1``'s (``quotient_trajectory`` takes it with that
    step's own learning rate), and a value held over the rows after its record (``every=K``: the same number
    repeated until the next refresh) is still the step before its record's.  The learning rate of that step is
    the ``lr`` of its row when the trajectory has one (records every step, held or not: exact), else interpolated
    linearly between the rows around it (records every ``K`` steps, a ``step`` key: exact for a schedule linear
    between two records, e.g. a constant or a linear warm-up; a schedule that jumps between two records is read
    between its values), the first row's before the first row.  NaN where the row itself has no learning rate
    (NaN in the trajectory's ``lr`` key)."""
    lr = np.asarray(lr, np.float64)
    steps = np.asarray(steps, np.int64)
    values = np.asarray(values, np.float64)
    n = len(lr)
    # a row repeating the previous row's value exactly holds it (a recomputed number equal to the last to every bit
    # is no coincidence that matters: a fold number of 0 crosses no level)
    held = np.r_[False, values[1:] == values[:-1]] if n else np.zeros(0, bool)
    first = np.maximum.accumulate(np.where(held, 0, np.arange(n)))  # the row of the record each row holds
    described = steps[first] - 1
    ok = np.isfinite(lr)
    out = np.full(n, np.nan)
    if ok.any():
        out = np.interp(described.astype(np.float64), steps[ok].astype(np.float64), lr[ok])
    return np.where(ok, out, np.nan)


def _per_row(fn, decay: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``fn(d)`` for the decay ``d`` of each row of ``idx`` (once per distinct value), NaN elsewhere and at rows
    without a learning rate (NaN in the trajectory's ``lr`` key: ``fn(nan)`` refused the whole trajectory)."""
    out = np.full(len(decay), np.nan)
    rows = idx[np.isfinite(decay[idx])]
    uniq, inverse = np.unique(decay[rows], return_inverse=True)
    out[rows] = np.array([fn(float(d)) for d in uniq], np.float64)[inverse]
    return out


def detect_fold(traj, *, steps, lr=None, fold_levels: Sequence[float] = (1.0, 2.0), rearm: float = 0.9,
                momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0, adaptive: bool = False,
                **_):
    """``fold``: the fold number ``eta max(0, kappa)`` of the step crossing 1 (the explicit step map folds) and
    2 (unstable), THEORY section 4; variant ``step`` with the decomposition at the nearest Hessian refresh.  Like
    :func:`detect_shock`, the Hessian's fold number ``fold_number_hessian = eta max(0, lambda_max)`` of the
    horizontal Hessian at the current point (THEORY section 3's mirror of the shock number; recorded at each
    refresh with ``hessian_every`` and ``"horizontal"`` in ``hessian_at``) is read too, at its refresh rows, with
    the same levels; its events name ``fold_number_hessian`` in ``observables``.  (It is the quantity of
    :func:`detect_edge_of_stability`'s ``step`` variant with the step's learning rate already applied, so it
    gives fold events also when no ``lr`` is known.)

    With momentum (``momentum=beta``, ``nesterov``) the levels are those of the momentum iteration on the
    quadratic (:func:`fold_levels_for`): level 1 is :func:`fold_edge` (the iterate overshoots the minimum,
    ``1 + beta`` for heavy ball, ``1`` for Nesterov) and level 2 is :func:`stability_edge` (``2 (1 + beta)``,
    Nesterov ``2 (1 + beta) / (1 + 2 beta)``); the event's
    ``details`` give the mapped ``level``, the ``gd_level`` it came from, ``fold_edge`` and ``edge``.

    ``weight_decay``: SGD's coupled weight decay (``optax.add_decayed_weights(weight_decay)`` before
    ``optax.sgd``: ``weight_decay * theta`` added to the gradient, not a term of the loss whose curvature
    ``kappa`` is), which adds ``weight_decay`` to the curvature the step sees: both levels move down by
    ``decay = lr * weight_decay`` (``fold_levels_for(..., decay=decay)``), ``lr`` the learning rate of the step
    the number describes (a schedule moves the levels): for ``fold_number`` recorded at step ``k`` (and held
    after it with ``every=K``), step ``k - 1``'s, the ``lr`` of that step's row (rows every ``K`` steps with a
    ``step`` key: interpolated linearly between the two rows around it; row ``k``'s own placed the levels one
    step's change of ``lr * weight_decay`` off), for ``fold_number_hessian`` the row's own; ``details`` also give
    ``decay``.  Not read with
    ``adaptive=True`` (AdamW's decay is decoupled; an adaptive run keeps gradient descent's levels, whatever
    ``momentum`` and ``nesterov``, which then means Nesterov Adam).

    Raises:
        ValueError: ``weight_decay > 0`` without a learning rate, or ``lr * weight_decay >= fold_edge(beta,
            nesterov)`` at a step read (the decay alone folds the step map: no fold level).
    """
    lr = _lr_of_rows(lr, steps)
    out = []
    fold_levels = _distinct_levels(fold_levels)
    for key, v, idx in _step_and_hessian_numbers(traj, "fold_number", steps):
        out += _fold_events(traj, key, v, idx, steps, lr, fold_levels, rearm, momentum, nesterov, weight_decay,
                            adaptive)
    return out


def _fold_events(traj, key, v, idx, steps, lr, fold_levels, rearm, momentum, nesterov, weight_decay,
                 adaptive) -> list[Event]:
    """The ``fold`` events of one fold-number key (rows ``idx``) of :func:`detect_fold`."""
    wd = 0.0 if adaptive else float(weight_decay)
    if adaptive:
        # an adaptive run keeps gradient descent's levels: SGD's momentum (and nesterov, which with adaptive=True
        # means Nesterov Adam) moved them, to 1.9 / 3.8 for momentum=0.9, as if the run were heavy ball
        momentum, nesterov = 0.0, False
    if not wd:
        mapped = fold_levels_for(fold_levels, momentum, nesterov)
        levels = [(g, m) for g, m in zip(fold_levels, mapped)]
    else:
        if lr is None:
            raise ValueError(f"detect: weight_decay={weight_decay!r} of an SGD run needs the learning rate (lr=, or "
                             f"the trajectory's 'lr' key) to place the fold levels (they move by lr * weight_decay)")
        # the per-step fold number of row k is step k - 1's (taken with its learning rate; held over the rows
        # after it with every=K): its levels move with that step's decay (row k's own learning rate placed them
        # one step's change of lr * weight_decay off: a warm-up from 0.3 to 0.8 with weight_decay=1 read 0.36 at
        # step 3 as a fold, level 1 - 0.8, where step 2 folds from 1 - 0.3 on); the Hessian's,
        # fold_number_hessian, is of the row's own step
        eta = _lr_of_described_steps(lr, steps, v) if key == "fold_number" else lr
        decay = _coupled_decay(eta, wd, idx, steps, fold_edge(momentum, nesterov),
                               f"fold_edge(momentum={float(momentum)!r}, nesterov={bool(nesterov)!r})",
                               "a fold level")
        folds = _per_row(lambda d: fold_edge(momentum, nesterov, decay=d), decay, idx)
        edges = _per_row(lambda d: stability_edge(momentum, nesterov, decay=d), decay, idx)
        levels = [(g, _per_row(lambda d, g=g: fold_levels_for((g,), momentum, nesterov, decay=d)[0], decay, idx))
                  for g in fold_levels]
    extra = ("curvature",) if key == "fold_number" else ("sharpness_horizontal",)
    out = []
    for gd_level, level in levels:
        for ev in _threshold_events(traj, key, v, idx, steps, "fold", level, "step", rearm, lr, extra):
            if wd:
                i = _row_of(steps, ev.step)
                ev = dataclasses.replace(ev, details={**ev.details, "gd_level": float(gd_level),
                                                      "fold_edge": float(folds[i]), "edge": float(edges[i]),
                                                      "decay": float(decay[i])})
            elif momentum:
                ev = dataclasses.replace(ev, details={**ev.details, "gd_level": float(gd_level),
                                                      "fold_edge": fold_edge(momentum, nesterov),
                                                      "edge": stability_edge(momentum, nesterov)})
            out.append(ev)
    return out


def detect_edge_of_stability(traj, *, steps, lr=None, eos_levels: Sequence[float] = (1.0, 2.0),
                             rearm: float = 0.9, momentum: float = 0.0, nesterov: bool = False,
                             adaptive: bool = False, b1: float = 0.9, weight_decay: float = 0.0,
                             **_) -> list[Event]:
    """``edge_of_stability``: ``eta * lambda_max`` crossing 1 and 2 (Cohen et al. 2021; THEORY sections 3-4).

    With momentum (``momentum=beta``, ``nesterov``) the edge of the step is not at ``eta lambda = 2`` but at
    :func:`stability_edge` (3.8 for heavy ball with ``beta = 0.9``): the levels are multiplied by
    ``stability_edge(beta, nesterov) / 2``, so that level 2 still means "unstable on the quadratic"; the event's
    ``details`` give the scaled ``level`` and the ``edge``.  ``weight_decay`` (without ``adaptive``): SGD's
    coupled weight decay (``optax.add_decayed_weights(weight_decay)`` before ``optax.sgd``: ``weight_decay *
    theta`` added to the gradient before the momentum trace, an L2 term that is not in the loss whose Hessian the
    sharpness keys measure); it adds ``weight_decay`` to every curvature the step sees, so the edge in ``eta
    lambda`` of the loss is ``stability_edge(beta, nesterov, decay=lr * weight_decay)`` ``= stability_edge(beta,
    nesterov) - lr * weight_decay``, with the learning rate of each step (it moves with a schedule); ``details``
    then give the ``edge`` and ``decay`` of the event's step.

    - variant ``step``: ``lambda_max`` of the horizontal Hessian at the current point (what the step sees), with
      the decomposition ``lambda_step = lambda_canonical * gauge_factor`` and ``gauge_factor_charges`` (the
      charge prediction) when recorded;
    - variant ``quotient``: the canonical sharpness (the function's own curvature, orbit invariant): "the
      balanced twin would be at the edge";
    - variant ``raw``: the raw Hessian's top eigenvalue.

    ``adaptive=True`` (an Adam / AdamW run with first-moment decay ``b1``; the runner says so from its config):
    an adaptive optimiser's step is stable or not according to its *preconditioned* Hessian (Cohen et al. 2022:
    Adam's ``lambda_max(P^-1 H)`` rises to and hovers at ``adam_edge(b1) / eta``), while ``eta lambda_max(H)`` of
    the raw or quotient Hessian has no stability level for it: the variants above give no events.  Instead,
    variant ``preconditioned``: ``eta * sharpness_preconditioned`` (``quotient_trajectory(hessian_at=(...,
    "preconditioned"), preconditioner=adam_preconditioner(...))``; raw kind) crossing the levels multiplied by
    :func:`adam_edge` ``(b1, decay=lr * weight_decay, nesterov=nesterov) / 2``, so that level 2 means "Adam
    unstable on the quadratic with its preconditioner frozen"; ``details`` give the scaled ``level``, the ``edge``,
    ``b1``, ``decay`` and ``nesterov``.  ``weight_decay``: AdamW's decoupled weight decay (``optax.adamw``'s
    ``weight_decay``, no mask), which lowers the edge to ``(2 - eta wd) (1 + b1) / (1 - b1)``; the product
    ``decay = eta wd`` is taken with the learning rate of each step (``lr`` per step: the edge moves with a
    schedule).  ``nesterov=True``: Nesterov Adam (``optax.adam(..., nesterov=True)``, ``optax.nadam`` /
    ``nadamw``), edge ``/ (1 + 2 b1)``.  Steps with ``b1^(k+1) > 0.05`` (the first 28 for ``b1 = 0.9``) are not
    read: there ``P`` still carries Adam's bias correction ``1 - b1^t`` (the sharpness is inflated by up to
    ``1 / (1 - b1)`` and ``P`` is far from frozen).  Without that key an adaptive run has no
    ``edge_of_stability`` events.  ``b1`` is read only with ``adaptive=True`` (``nesterov`` then means Nesterov
    Adam, ``weight_decay`` AdamW's decoupled decay, ``momentum`` is not read).

    A refreshed sharpness is read at its refreshes only: an event is at the first refresh at or above the level,
    never between refreshes, and there is none where no refresh reaches it.  Measured on 36 full-batch GD runs
    (4-16-16-1 ReLU and 4-32-1 tanh MLPs on teacher-student regression, a 64-16-10 ReLU MLP on 128 digits; float32
    and float64; ``lr * lambda_0`` 1.4-2.3; 100 steps; the Hessian every ``K`` steps; ``step`` variant): the 10
    runs whose ``lr * lambda_step`` stays below 2 have no level-2 event at any ``K``, the 9 above 2 at step 0 have
    it at step 0; of the 17 that cross later, ``K = 5`` finds 17 (0-4 steps after the every-step crossing; 14 and
    29 steps on two) and ``K = 20`` finds 11 (8-39 steps after) and **misses 6**: past the edge ``lr *
    lambda_step`` alternates from step to step (2.4-2.9 and 1.6-1.8, the period-two oscillation of the edge of
    stability), and an even ``K`` puts every refresh on the low phase (``K = 19`` or ``21``: 12 of the 12 of them
    rerun).  The same oscillation crosses the level and falls below ``rearm`` times it every other step: refreshed
    at every step, those 12 runs have 1-48 level-2 events each (median 9; 1-3 with ``rearm=0.5``).  The per-step
    ``fold_number`` (:func:`detect_fold`) sees every step.

    Raises:
        ValueError: ``adaptive=True`` with ``lr * weight_decay >= 2`` at a step read (the decay alone is unstable
            there: :func:`adam_edge` has no edge); an SGD run (``adaptive=False``) with ``lr * weight_decay >=
            stability_edge(beta, nesterov)`` at a step read (SGD's coupled decay alone is unstable there).
    """
    lr = _lr_of_rows(lr, steps)
    if lr is None:
        return []
    eos_levels = _distinct_levels(eos_levels)
    if adaptive:
        return _preconditioned_edge(traj, steps, lr, eos_levels, rearm, b1, weight_decay, nesterov)
    edge = stability_edge(momentum, nesterov)
    wd = float(weight_decay)
    out = []
    for variant in ("step", "quotient", "raw"):
        key = first_key(traj, SHARPNESS_KEYS[variant])
        if key is None:
            continue
        idx = np.nonzero(fresh_mask(traj, key, steps))[0]
        q = lr * np.asarray(traj[key], dtype=np.float64)
        if wd:
            # SGD's coupled decay adds weight_decay to the curvature the step sees: the edge of each row in
            # eta lambda of the loss is stability_edge - lr * weight_decay of that row
            decay = _coupled_decay(lr, wd, idx, steps, edge,
                                   f"stability_edge(momentum={float(momentum)!r}, nesterov={bool(nesterov)!r})",
                                   "an edge of stability")
            edges = _per_row(lambda d: stability_edge(momentum, nesterov, decay=d), decay, idx)
        for level in eos_levels:
            for ev in _threshold_events(traj, key, q, idx, steps, "edge_of_stability",
                                        level * (edges if wd else edge) / 2, variant, rearm, lr):
                # the row of the event; the learning rate *at* that step (with a
                # schedule, ``lr[0]`` was reported: a warm-up's first value instead of the one that crossed)
                i = _row_of(steps, ev.step)
                obs = {key: _f(traj[key][i]), "lr": _f(lr[i])}
                if wd:
                    details = {**ev.details, "edge": float(edges[i]), "decay": float(decay[i])}
                else:
                    details = {**ev.details, "edge": edge} if edge != 2 else ev.details
                out.append(Event(ev.step, ev.kind, ev.strength, obs, variant, is_invariant(obs), details))
    return out


#: Adam's bias-correction remainder ``b1^t`` up to which its preconditioned sharpness is not read (see below).
_ADAM_SETTLED = 0.05


def _preconditioned_edge(traj, steps, lr, eos_levels, rearm, b1, weight_decay=0.0, nesterov=False) -> list[Event]:
    """The ``preconditioned`` variant of :func:`detect_edge_of_stability` (an adaptive run)."""
    key = first_key(traj, SHARPNESS_KEYS["preconditioned"])
    if key is None:
        return []
    # Adam's first steps are left out: while b1^t is not small, P carries the bias correction (1 - b1^t), which
    # grows from 1 - b1 to 1 within a few 1 / (1 - b1) steps, so lambda_max(P^-1 H) is inflated by up to
    # 1 / (1 - b1) (10x at step 0 for b1 = 0.9: every run crossed the edge there) and P is not frozen, the premise
    # of adam_edge.  Row k holds the P of step k, t = k + 1.
    settled = np.power(float(b1), np.asarray(steps, np.float64) + 1) <= _ADAM_SETTLED
    idx = np.nonzero(fresh_mask(traj, key, steps) & settled)[0]
    # AdamW's decay enters as eta * wd of each step: with a schedule the edge moves with the learning rate
    decay = _decay_of_rows(lr, weight_decay, idx, steps, 2.0, "2 for an edge of stability",
                           "AdamW's decay alone, theta -> (1 - lr * weight_decay) theta, is unstable from 2 on")
    edges = _per_row(lambda d: adam_edge(b1, decay=d, nesterov=bool(nesterov)), decay, idx)
    q = lr * np.asarray(traj[key], dtype=np.float64)
    out = []
    for level in eos_levels:
        for ev in _threshold_events(traj, key, q, idx, steps, "edge_of_stability", level * edges / 2,
                                    "preconditioned", rearm, lr):
            i = _row_of(steps, ev.step)
            obs = {key: _f(traj[key][i]), "lr": _f(lr[i])}
            details = {**ev.details, "edge": float(edges[i]), "b1": float(b1), "decay": float(decay[i]),
                       "nesterov": bool(nesterov)}
            out.append(Event(ev.step, ev.kind, ev.strength, obs, "preconditioned", is_invariant(obs), details))
    return out


def _causal_mean(x: np.ndarray, k: int, starts: np.ndarray | None = None) -> np.ndarray:
    """The mean of the last ``k`` values at each row (fewer at the start), or with ``starts`` of the values
    ``x[starts[i] : i + 1]`` (:func:`_smooth_starts`, records at irregular steps).  A window that holds a
    non-finite value has the mean IEEE arithmetic gives it (``+inf``, ``-inf`` or NaN) and the windows after it
    are finite again: a running sum carried one ``inf`` or NaN into every later row (``inf - inf``), so that a
    single non-finite loss made the rest of the run one loss spike that never ended."""
    if starts is None and k <= 1:
        return x
    x = np.asarray(x, np.float64)
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(idx - k, 0) if starts is None else np.asarray(starts, np.int64)
    fin = np.isfinite(x)
    c = np.cumsum(np.r_[0.0, np.where(fin, x, 0.0)])
    out = (c[idx] - c[lo]) / (idx - lo)
    one = idx - lo == 1
    out[one] = x[one]  # a window of one row is the row itself (the difference of two running sums rounds)
    bad = np.cumsum(np.r_[0, ~fin])
    with np.errstate(invalid="ignore"):
        for i in np.flatnonzero(bad[idx] > bad[lo]):  # the windows holding a non-finite value, directly
            out[i] = np.mean(x[lo[i]:idx[i]])
    return out


def _smooth_starts(steps, smooth: int) -> np.ndarray | None:
    """For records at irregular steps, the first row of each row's causal mean over ``smooth`` steps: the rows
    ``j <= i`` recorded in the last ``smooth`` steps, ``steps[j] > steps[i] - smooth`` (for records every ``K``
    steps, exactly the last ``ceil(smooth / K)`` rows).  ``None`` for evenly spaced steps (the mean is then over a
    fixed number of records, :func:`_records`).  The median spacing's records averaged a run recorded every step
    for 1000 steps, then every 10, over 2 records (2 steps) in its dense part with ``spike_smooth=20``, and a live
    detector, whose median spacing was 1 until the sparse records outnumbered the dense ones, over 20: 348
    mini-batch loss spikes on the whole run, 360 live."""
    steps = irregular_steps(steps)
    return None if steps is None else np.searchsorted(steps, steps - int(smooth) + 1, side="left")


def _smoothed_loss(loss: np.ndarray, steps, spike_smooth: int) -> np.ndarray:
    """The loss the spike detectors read: its causal mean over ``spike_smooth`` steps (the loss itself for 1)."""
    if spike_smooth <= 1:
        return loss
    return _causal_mean(loss, _records(spike_smooth, steps), _smooth_starts(steps, spike_smooth))


def _loss_spikes(loss: np.ndarray, steps, spike_factor: float, spike_window: int):
    """:func:`~._series.spikes` of the (smoothed) loss with a window of ``spike_window`` steps: as many records
    for evenly spaced steps, the records covering them (the base) and that many steps after the peak (the end)
    for records at irregular steps."""
    starts = window_starts(steps, spike_window)
    return spikes(loss, spike_factor, _records(spike_window, steps), starts,
                  None if starts is None else steps, spike_window)


def detect_loss_spike(traj, *, steps, spike_factor: float = 2.0, spike_window: int = 50, spike_smooth: int = 1,
                      **_) -> list[Event]:
    """``loss_spike``: the loss exceeds ``spike_factor`` times its minimum over the previous ``spike_window``
    steps (orbit invariant; a negative minimum ``base`` must be exceeded by ``(spike_factor - 1) |base|``).
    ``strength`` = peak / base (``1 + (peak - base) / |base|`` in general).  With mini-batch losses set
    ``spike_smooth`` (a causal running mean over that many steps is tested instead): the raw mini-batch loss
    fluctuates by more than a factor 2 once it is small, which the detector would report as spikes.  Windows
    count steps (a trajectory kept every ``K`` steps: ``K`` steps per record; records at irregular steps: the base
    is the minimum over the records covering the previous ``spike_window`` steps, a record covering the steps up to
    the next one's, the running mean is over the records of the last ``spike_smooth`` steps, and a spike ends once
    the record before a row starts ``spike_window`` or more steps after its peak; the same records as for evenly
    spaced ones, whose windows are ``ceil(window / K)`` records, and chunk by chunk as on the whole run)."""
    loss = scalar(traj, "loss")
    if loss is None:
        return []
    loss = _smoothed_loss(loss, steps, spike_smooth)
    out = []
    for onset, end, peak, base in _loss_spikes(loss, steps, spike_factor, spike_window):
        out.append(Event(int(steps[onset]), "loss_spike", ratio(loss[peak], base), {"loss": _f(loss[onset])},
                         "quotient", True, {"base": base, "peak_step": int(steps[peak]), "end_step": int(steps[end]),
                                            "factor": spike_factor}))
    return out


#: The catapult's sharpness windows are sized so that a fall by exactly ``(1 - drop_factor) |before|`` is this many
#: standard errors of the difference of the two window medians (a fall that large from noise alone is then a
#: 4-sigma event at each of the up to ``confirm_window`` candidate records).
_CATAPULT_Z = 4.0
#: The standard error of the median of ``m`` Gaussian samples of deviation ``sigma`` is ``sqrt(pi / 2) sigma /
#: sqrt(m)`` (large ``m``).
_MEDIAN_SE = float(np.sqrt(np.pi / 2))
#: At least this many records (or the spike window's, if more) measure the sharpness's noise before a spike; with
#: fewer before it, the first this many of the series (some after the spike) measure it.
_CATAPULT_NOISE_RECORDS = 32
#: With fewer records in all the sharpness's noise is not measured, and no catapult is confirmed.
_CATAPULT_NOISE_MIN = 8


def _record_noise(v: np.ndarray) -> float:
    """The per-record noise (standard deviation) of a series of sharpness records, robustly: the median absolute
    second difference, ``x[i+1] - 2 x[i] + x[i-1]`` (``6 sigma^2`` for white noise; a linear trend adds nothing),
    scaled to a Gaussian's deviation.  0 with fewer than ``_CATAPULT_NOISE_MIN`` finite records (too few to
    measure)."""
    v = v[np.isfinite(v)]
    if v.size < _CATAPULT_NOISE_MIN:
        return 0.0
    d2 = v[2:] - 2.0 * v[1:-1] + v[:-2]
    return float(1.4826 * np.median(np.abs(d2)) / np.sqrt(6.0))


def _catapult_windows(noise: float, gap: float, n_before: int, n_noise: int, n_confirm: int) -> tuple[int, int]:
    """``(records before, records after)`` for the catapult's two medians: the fewest, equal where the ``n_before``
    records before the spike allow, such that ``_CATAPULT_Z`` standard errors of the difference of the medians
    fit in the fall ``gap`` that confirms it; ``(1, 1)`` for a noiseless series.  When no window after is long
    enough (too few records before a noisy spike, or ``gap = 0``: a sharpness of 0 before it) the window after is
    the ``n_confirm`` records of the confirm window (the window before: at most ``n_noise`` records) and the
    fall itself must then be ``_CATAPULT_Z`` standard errors."""
    if noise == 0:
        return 1, 1
    budget = (gap / (_CATAPULT_Z * _MEDIAN_SE * noise)) ** 2  # 1 / m_before + 1 / m_after must not exceed this
    if budget <= 0:
        return min(n_before, n_noise), n_confirm
    m_b = int(min(n_before, max(1.0, np.ceil(2.0 / budget))))
    rest = budget - 1.0 / m_b
    if rest <= 0:
        return m_b, n_confirm
    return m_b, int(min(n_confirm, max(1.0, np.ceil(1.0 / rest - 1e-9))))


def detect_catapult(traj, *, steps, lr=None, spike_factor: float = 2.0, spike_window: int = 50,
                    drop_factor: float = 0.8, confirm_window: int = 100, spike_smooth: int = 1,
                    horizon: int | None = None, **_) -> list[Event]:
    """``catapult`` (Lewkowycz et al. 2020): a loss spike followed by a lasting drop of the sharpness (the iterate
    lands in a flatter region).  One event per spike and sharpness variant (``quotient``: canonical sharpness,
    orbit invariant; ``step``: what the step sees, with the decomposition before and after; ``raw``).  The
    event's step is the spike onset; ``details.confirm_step`` is when the sharpness drop confirmed it.

    The drop compares robust summaries, not single samples: ``before`` = the median of the last ``m_b`` sharpness
    records at or before the onset, ``after`` = the median of ``m_a`` consecutive records starting at a record
    after the onset and at most ``confirm_window`` steps after the spike's end.  The catapult is confirmed at the
    first such record that is itself below the threshold and whose window median is below it too: below
    ``drop_factor * before`` (a negative ``before``, a top eigenvalue < 0, must be fallen below by
    ``(1 - drop_factor) |before|``).  The windows are sized from the data: the sharpness's per-record noise
    ``sigma`` is measured on the records before the onset (the last ``max(32, records in spike_window steps)``,
    from their median absolute second difference, which a linear trend does not inflate; before an early spike,
    with fewer than 32 records at or before its onset, on the first 32 records of the series, those after the
    onset included, or on all of them in a shorter series: a fall of the sharpness changes few of the second
    differences), and ``m_b``, ``m_a``
    are the fewest records (equal where the records before allow) for which a fall by exactly ``(1 - drop_factor)
    |before|`` is 4 standard errors of the difference of the two medians (``sqrt(pi / 2) sigma sqrt(1 / m_b + 1 /
    m_a)``).  Windows count *records*: a sharpness recorded every ``K`` steps (NaN or an unchanged
    ``hessian_step`` in between) has one record per ``K`` steps, so its windows span ``K`` times as many steps.
    A noiseless sharpness gives ``m_b = m_a = 1``, one sample against one; a window after that runs past the last
    record does not confirm (yet: a live detector confirms it once the records arrive), nor does a series of
    fewer than 8 sharpness records (its noise cannot be measured), nor a noisy sharpness with too few records
    before the spike for any window after to reach the 4 standard errors.  With ``horizon`` (the planned steps
    of a trajectory that is still arriving, as :class:`LiveDetector` sees it) an early spike is not judged until
    the records its noise is measured on have arrived (the first 32, or every planned record of a shorter run):
    judged on the fewer records so far, a live detector confirmed catapults that :func:`detect` on the whole run
    does not (a 4-16-16-1 ReLU MLP at ``lr = 2.5 / lambda_0``: the noise of its first 20 records 0.30, of its first
    30 0.89 as the sharpness oscillates at the edge; two spikes confirmed live, neither on the whole run, whatever
    the chunk sizes).  A run that stopped before then (fewer than ``min(32, planned)`` sharpness records, read
    with its planned ``horizon``) has its early spikes unconfirmed; read it without ``horizon`` to judge them on
    the records it has.  ``details`` hold ``sharpness_before`` /
    ``sharpness_after`` (the two medians), their ratio, ``window_before`` / ``window_after`` (records) and
    ``sharpness_noise`` (``sigma``).  Loss windows count steps, as in :func:`detect_loss_spike`.

    Measured (600 steps, loss spike at steps 300-307, sharpness 19 times ``1 + noise * N(0, 1)`` on every step,
    30 seeds per cell; before = one sample against any one after, as this detector compared until it used medians):

    =========================================  ===========  ===========  ===========  ===========
    relative noise                             1 %          5 %          10 %         20 %
    =========================================  ===========  ===========  ===========  ===========
    no sharpness change (false catapults)      0 / 0        0 / 0        21 / 0       29 / 0
    falls by 25 % at step 304 and stays down   30 / 30      30 / 30      30 / 30      30 / 29
    falls by 30 % or 50 %                      30 / 30      30 / 30      30 / 30      30 / 30
    =========================================  ===========  ===========  ===========  ===========

    (before / now, of 30).  The true catapults are reported at the spike onset (step 300), confirmed at step 303-305
    (median 304) for a 30-50 % fall.  A fall by exactly 20 % sits at the threshold: now 27-30 of 30 (always
    before), confirmed at the median step 305-306.  With 200 seeds at 10 % and 20 % noise: no false
    catapult.  The sharpness recorded every 10 steps (NaN between): false catapults 0 / 0 / 5 / 19 of 30 before,
    0 / 0 / 0 / 0 now; a 50 % fall is detected 30 / 30 at every noise level, a 30 % fall 30 / 30 up to 10 % noise
    and 9 / 30 at 20 % (30 / 30 before): the 30 records before and 10 in the confirm window cannot tell a 30 %
    fall from 20 % noise at 4 standard errors.

    Early spikes (400 steps, the same spike and sharpness with the spike at step ``onset``, the fall at ``onset +
    4``, 100 seeds per cell, before -> now; before, fewer than 8 records at or before the onset were compared one
    sample against one and 8-31 records measured the noise):

    ================================  ============  ============  ============  ============
    onset (records at or before it)   1 (2)         3 (4)         6 (7)         12 (13)
    ================================  ============  ============  ============  ============
    false catapults, 5 % noise        5 -> 0        6 -> 0        4 -> 0        0 -> 0
    false catapults, 10 % noise       70 -> 0       75 -> 0       72 -> 0       4 -> 1
    false catapults, 20 % noise       95 -> 0       96 -> 0       91 -> 0       4 -> 0
    50 % fall found, 10 % noise       100 -> 100    100 -> 100    100 -> 100    100 -> 100
    50 % fall found, 20 % noise       100 -> 80     100 -> 97     100 -> 98     94 -> 100
    30 % fall found, 10 % noise       100 -> 65     100 -> 91     100 -> 99     97 -> 100
    30 % fall found, 20 % noise       100 -> 15     100 -> 27     100 -> 56     59 -> 80
    ================================  ============  ============  ============  ============

    (A 30 % fall seen through 2-7 noisy records before it is at the edge of what 4 standard errors allow.)  Every
    10 steps, spike at step 5 / 35 (1 / 4 records before): false catapults 36 / 28 of 100 at 10 % noise and 73 /
    74 at 20 % before, 0 now; a 50 % fall is found 96 / 100 at 10 % noise, 47 / 91 at 20 %."""
    lr = _lr_of_rows(lr, steps)
    loss = scalar(traj, "loss")
    if loss is None:
        return []
    out = []
    loss = _smoothed_loss(loss, steps, spike_smooth)
    sp = _loss_spikes(loss, steps, spike_factor, spike_window)
    for variant in ("quotient", "step", "raw"):
        key = first_key(traj, SHARPNESS_KEYS[variant])
        if key is None:
            continue
        fidx = np.nonzero(fresh_mask(traj, key, steps))[0]
        if fidx.size == 0:
            continue
        sharp = np.asarray(traj[key], dtype=np.float64)
        rec_vals, rec_steps = sharp[fidx], np.asarray(steps)[fidx]  # the records
        # the spike window in sharpness records (recorded every K steps: one record per K steps)
        n_noise = max(_CATAPULT_NOISE_RECORDS, _records(spike_window, steps[fidx]))
        n_confirm = _records(confirm_window, steps[fidx])
        for onset, end, peak, base in sp:
            nb = int(np.searchsorted(fidx, onset, side="right"))  # records at or before the onset
            if nb == 0:
                continue
            ib = int(fidx[nb - 1])
            region = sharp[fidx[max(0, nb - n_noise):nb]]
            fin = region[np.isfinite(region)]
            level = float(np.median(fin)) if fin.size else float(sharp[ib])
            if nb >= _CATAPULT_NOISE_RECORDS:
                noise = _record_noise(region)
            else:
                # too few records before an early spike to measure the noise on: measured on the first 32 records
                # of the series (all of them, in a shorter one), those after the onset included (a fall of the
                # sharpness there changes few second differences, and their median not by much).  One sample
                # against one (fewer than 8 records before), or the noise of 8-31 records, read a noisy sharpness
                # as a catapult after 70-100 % / 5-8 % of early spikes at 10-20 % noise
                first = sharp[fidx[:_CATAPULT_NOISE_RECORDS]]
                if np.isfinite(first).sum() < _CATAPULT_NOISE_MIN:
                    continue  # (noise not measurable yet: a live detector confirms once 8 records have arrived)
                if horizon and fidx.size < min(_CATAPULT_NOISE_RECORDS, max(_records(int(horizon), steps[fidx]),
                                                                                fidx.size)):
                    continue  # (the records the noise is measured on have not all arrived: judged once they have)
                noise = _record_noise(first)
            m_b, m_a = _catapult_windows(noise, (1.0 - drop_factor) * abs(level), nb, n_noise, n_confirm)
            b0 = float(np.median(sharp[fidx[nb - m_b:nb]]))
            # the fall the noise alone reaches with probability ~ 3e-5 (implied by `below` with the sized windows)
            least = _CATAPULT_Z * _MEDIAN_SE * noise * np.sqrt(1.0 / m_b + 1.0 / m_a)
            # a fall by (1 - drop_factor) |before|: drop_factor * before for a positive sharpness; for a negative
            # one (a top eigenvalue < 0) drop_factor * before lies *above* it, and a rise from -1 to -0.9 read as a
            # drop confirming a catapult
            if b0 > 0:
                def below(x, b0=b0):
                    return x < drop_factor * b0
            else:
                def below(x, b0=b0):
                    return x - b0 < -(1.0 - drop_factor) * abs(b0)
            # the candidate records: within the confirm window, with their window of m_a records all arrived (not
            # confirmed yet otherwise); the first one below the threshold whose window median is below it too, and
            # below the sharpness before by `least`.  At once, not record by record with a median each: 1e5 steps of
            # a raw mini-batch loss (10891 spikes) took 160 s
            hi = min(int(np.searchsorted(rec_steps, steps[end] + confirm_window, side="right")), fidx.size - m_a + 1)
            ia = a_med = None
            if hi > nb:
                cand = np.arange(nb, hi)
                cand = cand[below(rec_vals[cand])]
                if cand.size:
                    med = np.median(np.lib.stride_tricks.sliding_window_view(rec_vals, m_a)[cand], axis=1)
                    ok = np.nonzero(below(med) & (b0 - med >= least))[0]
                    if ok.size:
                        ia, a_med = int(fidx[cand[ok[0]]]), float(med[ok[0]])
            if ia is None:
                continue
            obs = {"loss": _f(loss[onset]), key: _f(sharp[ib])}
            details: dict[str, Any] = {
                "loss_base": base, "loss_peak": _f(loss[peak]), "peak_step": int(steps[peak]),
                "sharpness_before": b0, "sharpness_after": a_med,
                "sharpness_ratio": _f(_ratio_or_inf(a_med, b0)), "confirm_step": int(steps[ia]),
                "window_before": m_b, "window_after": m_a, "sharpness_noise": noise,
            }
            if variant == "step":
                # each with the learning rate of its own step (a schedule moves it between the two)
                details["before"] = _decomposition(traj, ib, None if lr is None else float(lr[ib]), steps)
                details["after"] = _decomposition(traj, ia, None if lr is None else float(lr[ia]), steps)
            out.append(Event(int(steps[onset]), "catapult", ratio(loss[peak], base), obs, variant,
                             is_invariant(obs), details))
    return out


def _ratio_or_inf(a, b) -> float:
    """``a / b`` without a division warning (``+-inf`` or NaN for ``b = 0``: a catapult from a zero sharpness)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(a) / np.float64(b))


def _transform(v: np.ndarray, how: str) -> np.ndarray:
    if how == "log_diff":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.diff(np.log(v))
    if how == "diff":
        return np.diff(v)
    if how == "level":
        return v
    raise ValueError(f"unknown transform {how!r}; use 'log_diff', 'diff' or 'level'")


def _hold_between_records(v: np.ndarray) -> np.ndarray:
    """``v`` with each NaN row between two recorded (non-NaN) rows holding the last recorded value: a series
    recorded every ``K`` steps given as NaN in between reads as the same series held between records (as
    :func:`~quotient_sgd.optim.quotient_trajectory` keeps it).  Every difference of a NaN-interleaved series was NaN,
    every block was skipped and the key was never monitored.  NaN rows before the first record and after the last
    stay NaN (nothing is known there yet: a live chunk ending between records)."""
    rec = ~np.isnan(v)
    if rec.all() or not rec.any():
        return v
    last = np.maximum.accumulate(np.where(rec, np.arange(len(v)), -1))
    inner = ~rec & (last >= 0) & (np.arange(len(v)) < np.flatnonzero(rec)[-1])
    return np.where(inner, v[np.maximum(last, 0)], v)


def default_transition_keys(traj, variant: str = "quotient") -> list[str]:
    """Scalar keys monitored by default: orbit-invariant training-side observables (``loss``,
    ``grad_norm_canonical``, ``invariant_norms/*``) for ``quotient``; ``grad_norm`` for ``raw``.  Held-out metrics
    (``test_*``) are never defaults: they are what the detector is validated against.  ``traj`` may be nested, as
    :func:`~quotient_sgd.optim.train` returns it (its ``invariant_norms`` dict gives ``invariant_norms/<name>``, as
    :func:`detect` reads it; they were left out).

    Raises:
        ValueError: ``variant`` not ``"quotient"`` or ``"raw"`` (any other name, a misspelt ``"raw"`` included, was
            answered with the quotient keys)."""
    if not isinstance(variant, str) or variant not in ("quotient", "raw"):
        raise ValueError(f"default_transition_keys: variant={variant!r} is not allowed; need 'quotient' or 'raw' "
                         "(the variants of the transition detector)")
    traj = flatten_trajectory(traj, "default_transition_keys")
    if variant == "raw":
        return [k for k in ("grad_norm",) if k in traj]
    keys = [k for k in ("loss", "grad_norm_canonical") if scalar(traj, k) is not None]
    keys += sorted(k for k in traj if k.startswith("invariant_norms/") and np.asarray(traj[k]).ndim == 1)
    return keys


#: ``detect_transition``'s default ``trend_floor`` (see :func:`~quotient_sgd.diagnostics.cusum`)
TREND_FLOOR = 3.0
#: ``detect_transition``'s default ``rate_floor`` (see :func:`detect_transition`)
RATE_FLOOR = 0.1


def detect_transition(traj, *, steps, transition_keys: Sequence[str] | None = None, alpha: float = 0.05,
                      block: int | None = None, transform: str | Mapping[str, str] = "auto", k: float = 0.5,
                      min_ref: int = 10, horizon: int | None = None, variants=("quotient", "raw"),
                      trend_floor: float = TREND_FLOOR, rate_floor: float = RATE_FLOOR, **_):
    """``transition``: change points in quotient observables by the self-starting CUSUM of :mod:`._cusum`.

    Each monitored key is transformed (``log_diff``, the per-step change of its logarithm, for positive series,
    i.e. a change in its *rate*; ``diff`` otherwise, or as given; both divided by the steps between the rows, so
    that records at irregular steps, e.g. every step and then every 10, read one rate as one rate), averaged over
    blocks of ``block`` rows
    (default ``max(1, horizon // 100)`` with ``horizon``, else ``max(1, n // 100)``; in a trajectory kept every
    ``K`` steps, records: ``horizon`` steps are ``horizon / K`` records) and tested at level
    ``alpha / (number of monitored keys, quotient and raw variants together)``, so that

        P(any transition event on a stationary trajectory) <= alpha     (Bonferroni over keys)

    with the per-key bound of :func:`~quotient_sgd.diagnostics.cusum_threshold` (independent Gaussian block
    values; a serially correlated or heavy-tailed rate exceeds it unless ``block`` is several correlation times,
    measured rates in :mod:`._cusum`).  ``transition_keys``: the keys to monitor instead of the quotient
    :func:`default_transition_keys` (orbit invariants as variant ``quotient``, other keys as ``raw``; a key the
    trajectory lacks is skipped with a warning, as is one whose variant is not in ``variants``); the raw variant's
    default, ``grad_norm``, is monitored beside them (and shares ``alpha``) unless ``variants=("quotient",)``.
    ``horizon``: planned trajectory length in steps for live use (fixes the block length and the threshold, so that
    chunks of any size give the events of the whole trajectory; for records evenly spaced, every ``K`` steps:
    ``horizon / K`` planned records.
    Records at irregular steps are counted with the median spacing of the records so far, which a live detector sees
    change, e.g. every step, then every 10: the block length then depends on how much has arrived, and live events may
    differ from those of the whole run).  Event step: the alarm (causal detection time, end of the block);
    ``details.onset_step`` the estimated change point.  A key recorded every ``K`` steps may hold its value or be NaN
    between records: NaN rows between two records hold the last recorded value (the two forms give the same events);
    non-finite values otherwise (an infinite loss) skip the blocks that hold them.  ``transform="auto"`` (the
    default) reads a key by ``log_diff`` when none of its values is negative and some is positive, its exact
    zeros then skipped like non-finite values (a loss that reaches 0.0 keeps the events of the steps before
    it), else by ``diff``.

    ``trend_floor`` (default :data:`TREND_FLOOR` = 3) and ``rate_floor`` (default :data:`RATE_FLOOR` = 0.1; both 0:
    the noise estimate alone, as before they existed): the block values are standardised with a standard deviation
    of at least ``trend_floor`` times the drift the straight-line trend of the values since the last (re)start
    predicts, and, for a rate (``log_diff``, ``diff``), at least ``rate_floor`` times the magnitude of its running
    mean (:func:`~quotient_sgd.diagnostics.cusum`'s ``trend_floor`` and ``relative_floor``). A full-batch
    (deterministic) run's loss has a log-rate without noise that drifts smoothly as the modes of the loss decay;
    judged against its own spread, each drift was read as a change: on quiet full-batch GD runs (a 4-16-16-1 ReLU
    MLP on teacher-student regression, ``lr * lambda_max`` 0.35-1.25, 100 steps) 3-5 ``loss`` alarms a run, and as
    many on the gradient and invariant norms. With the floors a value that continues the trend, or moves less than
    ``k * rate_floor`` (5 %) of the rate, adds nothing to the statistic, while a break of the trend (a rate that
    jumps, stops, a plateau that ends in a drop) is judged against the trend's scale. Measured (default options,
    ``horizon`` = the run): 0 alarms on 46 quiet GD runs of three MLPs (4-16-16-1 ReLU, 4-32-1 tanh, 4-8-8-8-1 ReLU;
    3 seeds; ``lr * lambda_0`` 0.3-1.2; 100 / 500 / 2000 steps; before: 181 alarms in 27 of them), except one
    100-step run whose loss rate grew six-fold within 15 steps (a saddle escape: 2 alarms, on the gradient norms); 0
    on 90 noiseless exponentials, sums of exponentials and power laws (43 before); on a rate that changes three-fold
    along a logistic of width ``n / 10``, 5 of 60 series (60 of 60 before; none at width ``n / 5``). Abrupt changes
    with noise (rate x10, plateau then drop, a decay that stops, a four-fold slowdown) are found at the steps they
    are found without the trend floor, and within a block of those without either floor (the median delay unchanged,
    20-30 steps with blocks of 10); experiment 3's (grokking) change points after memorisation are still found on
    seeds 0 and 1. Not separated: a break of a long decaying (power-law) trend of the rate is judged against the
    whole trend since the restart, and a fall of the rate to a fraction of it is then missed.
    """
    n = len(steps)
    # with a planned horizon the block length must not depend on how much of the run has arrived: a block that
    # grew with the live trajectory re-detected the same change point once per block length (4 events for 1).
    # ``horizon`` counts steps, the blocks records: a trajectory kept every 10 steps with horizon=10000 had
    # blocks of 100 records (1000 steps), 10 blocks in all, and no transition was ever monitored
    plan = max(_records(int(horizon), steps), n) if horizon else n
    blk = int(block or max(1, plan // 100))
    out = []
    monitored = []
    variants = tuple(dict.fromkeys(variants))  # a variant given twice monitored its keys twice (as a key, below)
    if transition_keys is not None:
        # a key given twice was monitored twice: every change point of it reported twice, and the Bonferroni split
        # counted it twice (each key's level alpha / 3 for ["loss", "loss"] beside one raw key instead of alpha / 2)
        transition_keys = list(dict.fromkeys(transition_keys))
        # requested keys are monitored whatever their kind, in the variant their kind gives (a non-invariant key
        # such as ``grad_norm`` was silently dropped from both variants); absent ones are reported
        absent = [kk for kk in transition_keys if scalar(traj, kk) is None]
        if absent:
            warnings.warn(f"detect_transition: transition_keys {absent} are not scalar-per-step keys of the "
                          f"trajectory (keys: {sorted(traj)}); skipped", stacklevel=2)
    for variant in variants:
        keys = list(transition_keys) if (transition_keys is not None and variant == "quotient") \
            else default_transition_keys(traj, variant)
        if transition_keys is not None and variant == "raw":
            keys = [kk for kk in keys if kk not in transition_keys]
            keys += [kk for kk in transition_keys if not is_invariant([kk])]
        keys = [kk for kk in keys if scalar(traj, kk) is not None and (variant == "raw") != is_invariant([kk])]
        monitored += [(variant, kk) for kk in keys]
    if transition_keys is not None:
        # a requested key whose variant is not among ``variants`` (``grad_norm``, raw, with variants=("quotient",))
        # was not monitored, without a word
        left = [kk for kk in transition_keys if scalar(traj, kk) is not None and kk not in {m for _, m in monitored}]
        if left:
            warnings.warn(f"detect_transition: transition_keys {left} are monitored in the variant their kind gives "
                          f"({[('quotient' if is_invariant([kk]) else 'raw') for kk in left]}), which is not in "
                          f"variants={variants}; not monitored", stacklevel=2)
    # Bonferroni over every monitored key of every variant: the stated bound is on any transition event of the
    # run (split per variant, a trajectory with quotient and raw keys had twice the stated false-alarm rate)
    a = alpha / max(1, len(monitored))
    for variant, key in monitored:
        v = _hold_between_records(scalar(traj, key))
        how = transform.get(key, "auto") if isinstance(transform, Mapping) else transform
        if how == "auto":
            fin = v[np.isfinite(v)]
            # a series with no negative value is read by its log-rate, its exact zeros (a float32 cross-entropy
            # that saturates to 0.0, a zero-initialised head's norm at step 0) non-finite there, skipping the blocks
            # that hold them: one zero anywhere turned the whole run to raw differences, so that its last step
            # moved or removed the change points of every earlier step, and a live detector, which had read the
            # chunks before it by their log-rate, kept events the whole run does not have
            how = "log_diff" if fin.size and np.all(fin >= 0) and np.any(fin > 0) else "diff"
        x = _transform(v, how)
        if how in ("log_diff", "diff"):
            # the change per *step*: read per record, a run recorded every step, then every 10 steps, had a rate
            # ten times larger from the first sparse record on, a transition on a loss decaying at one rate
            x = x / np.diff(np.asarray(steps, np.float64))
        off = len(v) - len(x)  # x[j] describes the change into step j + off
        nb = len(x) // blk
        if nb <= min_ref:
            continue
        xb = x[: nb * blk].reshape(nb, blk)
        with np.errstate(invalid="ignore", over="ignore"):  # a block with a non-finite value is skipped
            xb = np.where(np.all(np.isfinite(xb), axis=1), xb.mean(axis=1), np.nan)
        hb = (plan - off) // blk if horizon else 0
        h = cusum_threshold(int(max(hb, np.isfinite(xb).sum())), a, k, min_ref)
        rf = rate_floor if how in ("log_diff", "diff") else 0.0  # (a level has no natural origin)
        for al in cusum(xb, alpha=a, k=k, min_ref=min_ref, threshold=h, trend_floor=trend_floor, relative_floor=rf):
            i_alarm = min(n - 1, (al.index + 1) * blk - 1 + off)
            i_onset = min(n - 1, al.onset * blk + off)
            obs = {key: _f(v[i_alarm])}
            out.append(Event(int(steps[i_alarm]), "transition", al.statistic / h, obs, variant,
                             is_invariant([key]),
                             {"observable": key, "onset_step": int(steps[i_onset]), "direction": al.direction,
                              "transform": how, "block": blk, "alpha": a, "threshold": h,
                              "kind_of_observable": kind_of(key)}))
    return out


#: Keys the detectors read as one value per step (besides ``loss``, ``step`` and ``lr``).
_SCALAR_KEYS = tuple(dict.fromkeys(
    [k for keys in SHARPNESS_KEYS.values() for k in keys if k.startswith("sharpness_")]
    + ["fold_number", "shock_number", "fold_number_hessian", "shock_number_hessian", "curvature",
       "gauge_factor_charges", "grad_norm", "grad_norm_canonical"]))


def _check_hessian_step(hs, shape) -> None:
    """``hessian_step`` holds one integer per row (the step of the Hessian refresh a row holds; ``-1`` or NaN:
    none yet), else ValueError naming it: a ``(steps, k)`` array failed in a bare broadcast error, strings in a
    bare float conversion, and ``2.5`` was truncated to 2."""
    hs = np.asarray(hs)
    if hs.shape != shape or real_kind(hs.dtype) not in "iuf":
        raise ValueError(f"detect: the trajectory's 'hessian_step' key must hold one integer per row of 'loss' "
                         f"(shape {shape}; -1 or NaN before the first refresh); got shape {hs.shape}, dtype "
                         f"{hs.dtype}")
    with np.errstate(invalid="ignore"):
        bad = np.nonzero(np.isfinite(hs) & (hs != np.round(hs)))[0] if real_kind(hs.dtype) == "f" else np.array([], int)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"detect: the trajectory's 'hessian_step' key must hold integer steps (-1 or NaN before "
                         f"the first refresh); got hessian_step[{i}] = {hs[i]!r} ({bad.size} non-integer value(s))")


_DETECTORS = {
    "divergence": detect_divergence, "shock": detect_shock, "fold": detect_fold,
    "edge_of_stability": detect_edge_of_stability, "loss_spike": detect_loss_spike,
    "catapult": detect_catapult, "transition": detect_transition,
}


def detect(trajectory, *, lr=None, kinds: Iterable[str] | None = None, start_step: int = 0, **options) -> list[Event]:
    """Detect phase transitions in a trajectory.

    Args:
        trajectory: ``dict[str, array]`` with leading axis = step (nested dicts such as ``charges`` allowed), the
            output of :func:`quotient_sgd.optim.train`, or a loaded ``trajectory.npz``.  A ``step`` key, when
            present, gives the step numbers (strictly increasing integers); otherwise ``start_step + arange(n)``
            (live chunks: pass the chunk's first step, or use :class:`LiveDetector`).  Every series has one row
            per step; one recorded every ``K`` steps holds its value or is NaN in between, except ``loss``: a
            non-finite loss is a ``divergence`` (a loss kept every ``K`` steps is given on rows of those steps,
            with a ``step`` key, not NaN in between).
        lr: learning rate (number or per-step array), needed by ``edge_of_stability``; defaults to the
            trajectory's ``lr`` / ``learning_rate`` key.
        kinds: detectors to run (default: all of :data:`ALL_KINDS`).
        **options: detector options (``alpha``, ``block``, ``transition_keys``, ``spike_factor``,
            ``spike_window``, ``spike_smooth``, ``drop_factor``, ``confirm_window``, ``eos_levels``, ``fold_levels``,
            ``shock_level``, ``rearm``, ``divergence_factor``, ``divergence_patience``, ``slice_shocks``, ``horizon``,
            ``transform``, ``k``, ``min_ref``, ``variants``, ``trend_floor``, ``rate_floor``;
            ``momentum``, ``nesterov`` and
            ``weight_decay`` (coupled: ``optax.add_decayed_weights`` before ``optax.sgd``, the edges move down by ``lr *
            weight_decay``) of an SGD run move the edge of stability to :func:`stability_edge` and the fold levels
            to :func:`fold_levels_for`;
            ``adaptive=True`` for an Adam-type run with first-moment decay ``b1`` (default 0.9), AdamW's
            ``weight_decay`` and ``nesterov`` for Nesterov Adam: ``edge_of_stability`` events only from the
            preconditioned sharpness, at :func:`adam_edge`, see :func:`detect_edge_of_stability`).

    Returns:
        Events sorted by step (then kind).

    Raises:
        TypeError: an option no detector takes (a misspelt option was ignored).
        ValueError: an unknown kind, an option or ``lr`` out of its range (the message names the allowed values),
            a ``loss`` that is not one value per step (e.g. a vmapped trajectory: pass one member), a series
            with another number of rows than ``loss``, or a ``step`` key that is not strictly increasing integers.

    Example:
        >>> import numpy as np
        >>> traj = {"loss": np.r_[np.linspace(1, .5, 50), [2.0, 3.0], np.linspace(.4, .1, 50)]}
        >>> [(e.step, e.kind) for e in detect(traj, kinds=["loss_spike"])]
        [(50, 'loss_spike')]
    """
    kinds = ALL_KINDS if kinds is None else check_kinds(kinds, ALL_KINDS)
    options = check_options(options)  # (one-pass iterables as tuples: checked, a generator was consumed)
    traj = flatten_trajectory(trajectory)
    if "loss" not in traj:
        raise KeyError(f"a trajectory needs at least the 'loss' key; got keys {sorted(traj)}")
    shape = np.shape(traj["loss"])
    if len(shape) != 1:
        # every detector reads scalar-per-step series: a (members, steps) trajectory switched them all off
        raise ValueError(f"detect: 'loss' must hold one value per step, shape (steps,); got shape {shape}. A "
                         "vmapped or swept trajectory has a leading member axis: pass one member, e.g. "
                         "jax.tree.map(lambda x: x[i], trajectory)")
    if "step" in traj and np.shape(traj["step"]) != shape:
        raise ValueError(f"detect: the trajectory's 'step' key has shape {np.shape(traj['step'])}; it must "
                         f"number the rows of 'loss', shape {shape}")
    # a scalar series of another length (recorded every K steps as its own short array) was read row by row
    # against the loss's steps: its events landed at the wrong steps, or an index error / broadcast error; a
    # series with a leading member axis (one member's loss taken out of a sweep, the rest not) was ignored
    short = {k: np.shape(v) for k, v in traj.items() if np.ndim(v) >= 1 and np.shape(v)[0] != shape[0]
             and k not in ("lr", "learning_rate")}
    if short:
        raise ValueError(f"detect: every series needs one row per row of 'loss' ({shape[0]}, leading axis); got "
                         f"shapes {short}. A series recorded every K steps is given on the trajectory's rows: its "
                         "last value held, or NaN between records (Hessian keys: with 'hessian_step' marking the "
                         "refreshes), as quotient_trajectory records them; of a swept trajectory pass one member, "
                         "every key")
    # a read key with one column per step, (steps, 1) or (steps, k), was skipped like a missing one: its detector
    # gave no events without a word (the hessian_top_* / hessian_bottom_* keys are (steps, k) by design)
    wide = {k: np.shape(traj[k]) for k in _SCALAR_KEYS if k in traj and np.ndim(traj[k]) != 1}
    if wide:
        raise ValueError(f"detect: the trajectory's keys {sorted(wide)} must hold one value per step, shape "
                         f"{shape}; got shapes {wide} (a column vector: take [:, 0]; the top eigenvalues of a "
                         "Hessian: the first column, as quotient_trajectory's sharpness_* keys hold it)")
    # a trajectory holding the Hessian's top-k alone ((steps, k) hessian_top_<where>: kept without the sharpness_*
    # keys, or built by hand) had no sharpness: its first column is the sharpness the detectors read
    for name, top in SHARPNESS_KEYS.values():
        if name not in traj and top in traj and np.ndim(traj[top]) == 2 and np.shape(traj[top])[1] >= 1:
            traj[name] = np.asarray(traj[top])[:, 0]
    if "hessian_step" in traj:
        _check_hessian_step(traj["hessian_step"], shape)
    steps = steps_of(traj, start_step)
    lr_arr = learning_rate(traj, lr, len(steps))
    events: list[Event] = []
    for kd in kinds:
        events += _DETECTORS[kd](traj, steps=steps, lr=lr_arr, **options)
    return sorted(events, key=lambda e: (e.step, e.kind, e.variant))


def _checked(fn):
    """The public ``detect_*`` of the per-kind detector ``fn``: its options checked by name as :func:`detect`
    checks them (called directly, a misspelt option, ``fold_level=``, went into ``**_`` without a word, and one out
    of range, ``spike_factor=0.5`` or ``rearm=5``, was used as it came), a nested trajectory flattened and ``steps``
    read as integers; :func:`detect` calls ``fn`` itself, with what it has checked."""
    name = fn.__name__

    @functools.wraps(fn)
    def public(traj, *, steps, lr=None, **options):
        options = check_options(options, name)
        traj = flatten_trajectory(traj, name)
        steps = _checked_steps(name, traj, steps)
        return fn(traj, steps=steps, lr=_checked_lr(name, lr, len(steps)), **options)

    return public


def _checked_lr(name: str, lr, n: int) -> np.ndarray | None:
    """``lr`` given to the public ``detect_*`` function ``name`` as one float64 per row (``None`` stays ``None``),
    when it is a number or one value per row, finite and ``>= 0``, as :func:`detect` takes its ``lr``; else
    ValueError naming ``name`` and ``lr``.  A float64 array of one value per row went to the detector unchecked
    (it is how :func:`detect` hands over the learning rates it has checked): ``lr = -0.1`` on a sharpness of -30
    gave four ``edge_of_stability`` events of strength 3.0, ``lr = inf`` none on a negative sharpness and
    strength ``inf`` on any positive one, where the same values as float32, or given to :func:`detect`, are
    refused."""
    if lr is None:
        return None
    arr = check_lr(lr, name)
    if arr.ndim == 1 and arr.shape[0] != n:
        raise ValueError(f"{name}: lr of shape {arr.shape} is not allowed; need a number or one value per row of the "
                         f"trajectory (shape ({n},))")
    return np.broadcast_to(arr, (n,)).astype(np.float64)


def _checked_steps(name: str, traj, steps) -> np.ndarray:
    """``steps`` given to the public ``detect_*`` function ``name`` as int64, when they are one integer step number
    per row of the trajectory (the rows of ``loss``, else of its series), strictly increasing and of magnitude
    ``< 2**53``, as :func:`detect` reads a ``step`` key; else ValueError naming ``steps``.  Cast as they came, steps
    of another length failed in a bare ``IndexError`` or broadcast error, or were read as they were (200 steps for a
    trajectory of 102 rows), steps in another order put the events at the wrong steps (reversed, a fold at step 67
    before one at step 33), and fractional steps were truncated (``0.5 * arange(n)``: every step twice)."""
    raw = np.asarray(steps)
    rows = None
    if "loss" in traj and np.ndim(traj["loss"]) >= 1:
        rows = int(np.shape(traj["loss"])[0])
    else:
        lens = {int(np.shape(v)[0]) for v in traj.values() if np.ndim(v) >= 1}
        rows = lens.pop() if len(lens) == 1 else None
    need = ("need one integer step number per row of the trajectory" + (f" ({rows} rows)" if rows is not None
            else "") + ", strictly increasing, of magnitude < 2**53 (the 'step' key detect reads)")
    if raw.ndim != 1 or real_kind(raw.dtype) not in "iuf":
        raise ValueError(f"{name}: steps of shape {raw.shape} and dtype {raw.dtype} is not allowed; {need}")
    if rows is not None and raw.shape[0] != rows:
        raise ValueError(f"{name}: steps of length {raw.shape[0]} is not allowed; {need}")
    with np.errstate(invalid="ignore"):
        bad = np.flatnonzero((raw != np.round(raw)) | (np.abs(raw) >= 2**53))
    if bad.size:
        raise ValueError(f"{name}: steps[{int(bad[0])}] = {raw[bad[0]].item()!r} is not allowed; {need}")
    out = raw.astype(np.int64)
    back = np.flatnonzero(np.diff(out) <= 0)
    if back.size:
        i = int(back[0])
        raise ValueError(f"{name}: steps[{i}] = {int(out[i])} followed by steps[{i + 1}] = {int(out[i + 1])} is not "
                         f"allowed; {need}")
    return out


detect_divergence = _checked(detect_divergence)
detect_shock = _checked(detect_shock)
detect_fold = _checked(detect_fold)
detect_edge_of_stability = _checked(detect_edge_of_stability)
detect_loss_spike = _checked(detect_loss_spike)
detect_catapult = _checked(detect_catapult)
detect_transition = _checked(detect_transition)
