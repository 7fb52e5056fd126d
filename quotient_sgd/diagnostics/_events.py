"""Detected events and their JSON form (the ``events.json`` of a run directory, DESIGN "The run directory")."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any, Iterable, Mapping

import numpy as np

from .._durable import durable_write

#: Variants of a detector: which version of the observable it reads (THEORY section 4).
#: ``"quotient"``: orbit invariants (canonical point); ``"step"``: what the step actually sees (reduced dynamics,
#: reported with its decomposition); ``"raw"``: raw parameter-space quantities, for comparison only;
#: ``"preconditioned"``: an adaptive optimiser's preconditioned sharpness (``edge_of_stability`` of Adam, raw kind).
VARIANTS = ("quotient", "step", "raw", "preconditioned")


def _clean(x: Any) -> Any:
    """JSON-safe copy: numpy scalars -> float/int, non-finite floats -> ``"inf"``/``"-inf"``/``"nan"`` strings."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 0) == 0:
        x = x.item()
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    return str(x)


def _unclean(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _unclean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unclean(v) for v in x]
    if x in ("inf", "-inf", "nan"):
        return float(x)
    return x


@dataclasses.dataclass(frozen=True)
class Event:
    """One detected phase transition / shock.

    Attributes:
        step: the training step at which the detector fires (causal: computable from the trajectory up to
            ``step`` plus, for ``catapult``, the confirmation window stated in ``details``).
        kind: ``"shock"``, ``"fold"``, ``"edge_of_stability"``, ``"catapult"``, ``"loss_spike"``,
            ``"transition"`` or ``"divergence"``.
        strength: a dimensionless size (shock / fold number, eta*lambda, spike ratio, CUSUM statistic / threshold).
        observables: ``{trajectory key: value at step}`` of the observables that triggered it.
        variant: ``"quotient"`` (orbit invariants), ``"step"`` (what the step sees), ``"raw"`` or
            ``"preconditioned"`` (Adam's preconditioned sharpness).
        invariant: True when every triggering observable is an orbit invariant, so that the event is identical on
            a trajectory and on its re-gauged copy (THEORY section 4).
        details: detector-specific numbers, e.g. the stability decomposition
            ``{"lr_times_lambda_step", "lambda_canonical", "gauge_factor", "gauge_factor_charges"}``, the level
            crossed, the estimated onset step of a change point.
    """

    step: int
    kind: str
    strength: float
    observables: dict = dataclasses.field(default_factory=dict)
    variant: str = "quotient"
    invariant: bool = False
    details: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        """The event as a JSON-serialisable dict: NumPy scalars become Python numbers, non-finite floats the
        strings ``"inf"`` / ``"-inf"`` / ``"nan"`` (strict JSON has no such numbers), anything else not JSON its
        ``str``; :meth:`from_dict` reads it back."""
        return _clean(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "Event":
        """The event of a dict written by :meth:`to_dict` (the strings ``"inf"`` / ``"-inf"`` / ``"nan"`` back to
        floats); missing optional fields take their defaults."""
        missing = [k for k in ("step", "kind", "strength") if not isinstance(d, Mapping) or k not in d]
        if missing:
            # (a bare KeyError 'step', or "dictionary update sequence element #0 has length 1" for a non-mapping)
            raise ValueError(f"Event.from_dict: need a mapping with 'step', 'kind' and 'strength' (as Event.to_dict "
                             f"writes it); got {_short(d)} without {missing}")
        d = _unclean(dict(d))
        step, strength = d["step"], d["strength"]
        if isinstance(step, bool) or not isinstance(step, numbers.Real) or not float(step).is_integer():
            # (2.7 was read as step 2)
            raise ValueError(f"Event.from_dict: step={step!r} is not allowed; need an integer step")
        if isinstance(strength, bool) or not isinstance(strength, (numbers.Real, str)) or (
                isinstance(strength, str) and strength not in ("inf", "-inf", "nan")):
            raise ValueError(f"Event.from_dict: strength={strength!r} is not allowed; need a number (or 'inf', '-inf', "
                             "'nan')")
        # the other fields as to_dict writes them: read as they came, "invariant": "false" was True (bool of a
        # non-empty string), and "details": null or a list failed in a bare TypeError that load_events did not name
        for name, ok, need in (("kind", isinstance(d["kind"], str), "a string"),
                               ("variant", isinstance(d.get("variant", ""), str), "a string"),
                               ("invariant", isinstance(d.get("invariant", False), (bool, np.bool_)), "true or false"),
                               ("observables", isinstance(d.get("observables", {}), Mapping), "a mapping"),
                               ("details", isinstance(d.get("details", {}), Mapping), "a mapping")):
            if not ok:
                raise ValueError(f"Event.from_dict: {name}={_short(d[name])} is not allowed; need {need} (as "
                                 "Event.to_dict writes it)")
        return cls(
            step=int(step), kind=d["kind"], strength=float(strength),
            observables=dict(d.get("observables", {})), variant=d.get("variant", "quotient"),
            invariant=bool(d.get("invariant", False)), details=dict(d.get("details", {})),
        )

    def key(self) -> tuple:
        """Identity used to de-duplicate events found again on a longer trajectory (live detection)."""
        return (self.kind, self.variant, self.step, self.details.get("level"), self.details.get("observable"))


def events_to_json(events: Iterable[Event]) -> str:
    return json.dumps([e.to_dict() for e in events], indent=1)


def _short(x: Any) -> str:
    r = repr(x)
    return r if len(r) <= 120 else r[:117] + "..."


def save_events(path: str | os.PathLike, events: Iterable[Event]) -> None:
    """Write ``events`` to ``path`` (``events.json``), atomically and durably (written to a temporary file,
    ``fsync``-ed, renamed: :func:`quotient_sgd._durable.durable_write`).

    Raises:
        IsADirectoryError: ``path`` is a directory (the events were written to ``path + ".tmp"``, left beside
            it, and the rename failed naming that file).
        FileNotFoundError: ``path``'s directory does not exist (the error named the temporary ``.tmp`` file).
        TypeError: ``events`` not an iterable of :class:`Event` (one event, or the dicts ``Event.to_dict``
            writes, failed in a bare ``'Event' object is not iterable`` / ``'dict' object has no attribute
            'to_dict'``, leaving ``path + ".tmp"`` behind); nothing is written then."""
    if isinstance(events, (Event, str, bytes, Mapping)) or not hasattr(events, "__iter__"):
        raise TypeError(f"save_events: events must be an iterable of Event (e.g. the list detect returns); got a "
                        f"{type(events).__name__}")
    events = list(events)
    bad = [i for i, e in enumerate(events) if not isinstance(e, Event)]
    if bad:
        raise TypeError(f"save_events: events[{bad[0]}] is a {type(events[bad[0]]).__name__}, not an Event "
                        f"({len(bad)} such entries; a dict as Event.to_dict writes it is read by Event.from_dict)")
    text = events_to_json(events)
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"save_events: path={path!r} is a directory; need the path of the events file, e.g. "
                                f"{os.path.join(path, 'events.json')!r}")
    where = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(where):
        raise FileNotFoundError(f"save_events: path={path!r} is not allowed: its directory {where!r} does not exist "
                                "(or is not a directory)")
    with durable_write(path) as f:
        f.write(text)


def load_events(path: str | os.PathLike) -> list[Event]:
    """The events of an ``events.json`` (as written by a run, a sweep member or :func:`save_events`).

    Raises:
        ValueError: the file is not JSON, or not a list of events as :meth:`Event.to_dict` writes them (the message
            names the file and the entry; a bare ``KeyError: 'step'`` before)."""
    with open(path) as f:
        try:
            data = json.load(f)
        except ValueError as e:
            raise ValueError(f"load_events: {os.fspath(path)!r} is not JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"load_events: {os.fspath(path)!r} holds a {type(data).__name__}; need a list of events (as "
                         "save_events writes them)")
    out = []
    for i, d in enumerate(data):
        try:
            out.append(Event.from_dict(d))
        except ValueError as e:
            raise ValueError(f"load_events: {os.fspath(path)!r}, entry {i}: {e}") from None
    return out
