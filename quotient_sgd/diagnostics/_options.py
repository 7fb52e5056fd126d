"""Checking the options of :func:`~quotient_sgd.diagnostics.detect` once, before any detector runs.

The detectors take their options as keyword arguments and ignore the ones meant for other detectors, so a
misspelt option (``spike_factr=3``) or a value outside its range (``block=-1``, ``spike_factor=0.5``) used to
switch a detector off or make it fire everywhere without a word.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping

import numpy as np

from ._series import plain_scalar, real_kind

_TRANSFORMS = ("auto", "log_diff", "diff", "level")
_TRANSITION_VARIANTS = ("quotient", "raw")


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and bool(np.isfinite(v))


def _int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _names(v, allowed=None) -> bool:
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        return False
    v = list(v)
    return all(isinstance(x, str) for x in v) and (allowed is None or set(v) <= set(allowed))


def _levels(v) -> bool:
    """A non-empty sequence of finite numbers > 0: Python, NumPy or 0-d JAX numbers (a JAX array of levels,
    ``jnp.array([1.0, 2.0])``, was refused where the NumPy array was taken)."""
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__") or getattr(v, "ndim", 1) != 1:
        return False
    v = [plain_scalar(x) for x in v]
    return len(v) > 0 and all(_real(x) and x > 0 for x in v)


def number(v) -> float | None:
    """``v`` as a float when it is a real number: a Python or NumPy number, or a 0-d NumPy / JAX array of an integer
    or floating dtype (what :func:`~quotient_sgd.hj.shock_time` and ``SliceFlow.shock_time`` return); else
    ``None`` (a bool, a string, an array of another shape or dtype)."""
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, numbers.Real):
        return float(v)
    if hasattr(v, "__array__") and getattr(v, "ndim", None) == 0:
        try:
            a = np.asarray(v)
        except Exception:  # (a traced value)
            return None
        if real_kind(a.dtype) in "iuf":
            return float(a)
    return None


def _slice_shock(s) -> bool:
    """One entry of ``slice_shocks``: a mapping with an integer ``step`` (``2.0`` counts; ``2.5`` was truncated to
    2, a string failed in a bare ``int()``), a ``shock_time > 0`` (``inf``: a slice that never shocks, strength 0;
    NaN or a negative time gave an event of strength NaN or ``inf``) and, if given, a finite ``lr >= 0``; each a
    number or a 0-d array of one (the 0-d JAX array ``shock_time`` returns was refused)."""
    if not isinstance(s, Mapping) or "step" not in s or "shock_time" not in s:
        return False
    st, t = number(s["step"]), number(s["shock_time"])
    lr = number(s["lr"]) if "lr" in s else 0.0
    step_ok = st is not None and np.isfinite(st) and st.is_integer()
    lr_ok = lr is not None and np.isfinite(lr) and lr >= 0
    t_ok = t is not None and t > 0  # (> 0 is False for NaN; inf: a slice that never shocks)
    return step_ok and t_ok and lr_ok


def _transform(v) -> bool:
    if isinstance(v, Mapping):
        return all(isinstance(k, str) and x in _TRANSFORMS for k, x in v.items())
    return v in _TRANSFORMS


#: option -> (check, what is allowed)
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "alpha": (lambda v: _real(v) and 0 < v < 1, "a number in (0, 1)"),
    "block": (lambda v: v is None or (_int(v) and v >= 1), "None or an integer >= 1"),
    "horizon": (lambda v: v is None or (_int(v) and v >= 1), "None or an integer >= 1 (planned steps)"),
    "k": (lambda v: _real(v) and v >= 0, "a finite number >= 0"),
    "trend_floor": (lambda v: _real(v) and v >= 0,
                    "a finite number >= 0 (the noise floor in units of the monitored values' trend; 0: none)"),
    "rate_floor": (lambda v: _real(v) and v >= 0,
                   "a finite number >= 0 (a rate's noise floor in units of its running mean's magnitude; 0: none)"),
    "min_ref": (lambda v: _int(v) and v >= 2, "an integer >= 2"),
    "transition_keys": (lambda v: v is None or _names(v),
                        "None or a sequence of trajectory keys, e.g. ('loss',) (not a single string)"),
    "transform": (_transform, f"one of {_TRANSFORMS} or a mapping key -> one of them"),
    "variants": (lambda v: _names(v, _TRANSITION_VARIANTS),
                 f"a sequence of names from {_TRANSITION_VARIANTS}, e.g. ('quotient',)"),
    "spike_factor": (lambda v: _real(v) and v > 1, "a finite number > 1"),
    "spike_window": (lambda v: _int(v) and v >= 1, "an integer >= 1 (steps)"),
    "spike_smooth": (lambda v: _int(v) and v >= 1, "an integer >= 1 (steps)"),
    "drop_factor": (lambda v: _real(v) and 0 < v < 1, "a number in (0, 1)"),
    "confirm_window": (lambda v: _int(v) and v >= 1, "an integer >= 1 (steps)"),
    "eos_levels": (_levels, "a non-empty sequence of finite numbers > 0, e.g. (1.0, 2.0)"),
    "momentum": (lambda v: _real(v) and 0 <= v < 1, "a number in [0, 1) (SGD's momentum beta)"),
    "nesterov": (lambda v: isinstance(v, (bool, np.bool_)), "True or False"),
    "adaptive": (lambda v: isinstance(v, (bool, np.bool_)), "True or False (an Adam-type optimiser)"),
    "b1": (lambda v: _real(v) and 0 <= v < 1,
           "a number in [0, 1) (Adam's first-moment decay; read with adaptive=True)"),
    "weight_decay": (lambda v: _real(v) and v >= 0,
                     "a finite number >= 0 (with adaptive=True AdamW's decoupled weight decay, optax.adamw's "
                     "weight_decay; else SGD's coupled one, optax.add_decayed_weights before optax.sgd)"),
    "fold_levels": (_levels, "a non-empty sequence of finite numbers > 0, e.g. (1.0, 2.0)"),
    "shock_level": (lambda v: _real(v) and v > 0, "a finite number > 0"),
    "rearm": (lambda v: _real(v) and 0 < v <= 1, "a number in (0, 1]"),
    "divergence_factor": (lambda v: _real(v) and v > 1, "a finite number > 1"),
    "divergence_patience": (lambda v: _int(v) and v >= 1, "an integer >= 1 (steps)"),
    "slice_shocks": (lambda v: not isinstance(v, (str, bytes, Mapping)) and hasattr(v, "__iter__")
                     and all(_slice_shock(s) for s in v),
                     "a sequence of mappings with an integer 'step', a 'shock_time' > 0 (not NaN) and, if given, a "
                     "finite 'lr' >= 0 (numbers, or 0-d arrays of them)"),
}

OPTIONS = tuple(_CHECKS)


def _materialise(value):
    """A one-pass iterable (a generator, ``map``, ``iter(...)``) as a tuple: checked, it was consumed, and the
    detector then read an empty sequence (no monitored keys, no levels: no events, without a word).  A 0-d NumPy /
    JAX array of a real or boolean dtype (``momentum`` read from an optimiser state) as the Python number or bool
    it holds: it failed in a bare ``TypeError: iteration over a 0-d array``.  Strings, mappings and re-iterable
    values (lists, tuples, arrays) are kept as they are."""
    if isinstance(value, (str, bytes, Mapping)):
        return value
    if hasattr(value, "__array__") and getattr(value, "ndim", None) == 0:
        return plain_scalar(value)
    if not hasattr(value, "__iter__"):
        return value
    return tuple(value) if iter(value) is value else value


def check_options(options: Mapping[str, Any], where: str = "detect") -> dict[str, Any]:
    """Raise ``TypeError`` for an option no detector takes and ``ValueError`` for a value outside its range; return
    the options with one-pass iterables as tuples (see :func:`_materialise`), to be used instead of the given ones."""
    unknown = sorted(set(options) - set(_CHECKS))
    if unknown:
        raise TypeError(f"{where}: unknown option(s) {unknown}; the detectors' options are {sorted(_CHECKS)}")
    options = {name: _materialise(value) for name, value in options.items()}
    for name, value in options.items():
        ok, allowed = _CHECKS[name]
        if not ok(value):
            raise ValueError(f"{where}: {name}={value!r} is not allowed; need {allowed}")
    return options


def check_kinds(kinds, all_kinds) -> tuple[str, ...]:
    """``kinds`` as a tuple without repeats (a repeated kind reported every event twice)."""
    if isinstance(kinds, (str, bytes)) or not hasattr(kinds, "__iter__"):
        raise ValueError(f"kinds must be a sequence of event kinds, e.g. ({kinds!r},), not {kinds!r}; "
                         f"available: {list(all_kinds)}")
    kinds = tuple(dict.fromkeys(kinds))
    unknown = [kd for kd in kinds if kd not in all_kinds]
    if unknown:
        raise ValueError(f"kinds: unknown event kinds {unknown}; available: {list(all_kinds)}")
    return kinds
