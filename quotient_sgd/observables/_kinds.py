"""The three kinds of observable (THEORY section 4) and the registry that declares each one's kind."""

from __future__ import annotations

from typing import Callable, TypeVar

#: Functions of the network function alone: equal on ``theta`` and ``g . theta`` for every group element ``g``.
ORBIT_INVARIANT = "orbit_invariant"
#: Functions of (orbit, charges): what the optimiser actually does on the quotient.  Invariant under the
#: charge-preserving elements (permutations, orthogonal GL); for the others they follow the decomposition into
#: an orbit part and a charge part (THEORY section 4).
REDUCED_DYNAMICS = "reduced_dynamics"
#: Raw parameter-space quantities, reported for comparison only (never used alone by a diagnostic).
RAW = "raw"

KINDS_ALLOWED = (ORBIT_INVARIANT, REDUCED_DYNAMICS, RAW)

#: ``trajectory key -> kind`` for every key the package emits.
KINDS: dict[str, str] = {}

F = TypeVar("F", bound=Callable)


def observable(kind: str, *keys: str) -> Callable[[F], F]:
    """Declare the kind of an observable function (sets ``fn.kind``) and register the trajectory ``keys`` it
    produces (``fn.keys``)."""
    if kind not in KINDS_ALLOWED:
        raise ValueError(f"unknown observable kind {kind!r}; expected one of {KINDS_ALLOWED}")

    def deco(fn: F) -> F:
        fn.kind = kind  # type: ignore[attr-defined]
        fn.keys = keys  # type: ignore[attr-defined]
        for k in keys:
            KINDS[k] = kind
        return fn

    return deco


def kind_of(key: str) -> str:
    """The kind (``"orbit_invariant"``, ``"reduced_dynamics"`` or ``"raw"``) of a trajectory key.

    A ``"/"``-joined key of a flattened trajectory (``trajectory.npz``: ``"charges/rescale/layers.0"``) has the
    kind of the observable it starts with.  Every key a trajectory of :func:`quotient_sgd.optim.train` or a run
    directory can hold has a kind: ``"aux"`` (and ``"aux/..."``, what ``loss_fn`` returns beside the loss with
    ``has_aux=True``) and ``"step"`` (a run's step index) are ``"raw"``.  Raises ``KeyError`` naming the key when
    no observable emits it.
    """
    try:
        return KINDS[key.split("/")[0] if isinstance(key, str) else key]  # (a non-str key: the KeyError below)
    except KeyError:
        raise KeyError(f"no observable emits the trajectory key {key!r}; known keys: {sorted(KINDS)}") from None
