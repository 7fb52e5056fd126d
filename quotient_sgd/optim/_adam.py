"""Adam's diagonal preconditioner, read out of an optimiser state (Cohen et al. 2022; THEORY section 4).

Adam's step is ``theta <- theta - eta m_hat / (sqrt(v_hat + eps_root) + eps)`` with ``m = b1 m + (1 - b1) g``,
``v = b2 v + (1 - b2) g^2`` and the bias corrections ``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 - b2^t)``.  Written
as ``theta <- theta - eta P^-1 m`` it is EMA momentum preconditioned by the diagonal

    P = (1 - b1^t) (sqrt(v_hat + eps_root) + eps).

With ``P`` frozen, on a quadratic of Hessian ``H`` this iteration is stable iff ``eta lambda_max(P^-1 H) <
2 (1 + b1) / (1 - b1)`` (:func:`quotient_sgd.diagnostics.adam_edge`): in the eigenbasis of ``P^-1/2 H P^-1/2``
each mode ``a`` follows ``m+ = b1 m + (1 - b1) a x``, ``x+ = x - eta m+``, whose roots leave the unit disc through
``-1`` at ``eta a (1 - b1) = 2 (1 + b1)``; AdamW's decoupled decay ``eta wd`` and Nesterov Adam lower that
edge (``adam_edge(b1, decay=eta * wd, nesterov=...)``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from .._tree import widen


def _check_number(name: str, value, *, rate: bool) -> float:
    """``value`` as a float: a decay rate in ``[0, 1)`` (``rate``) or a finite number ``>= 0``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"adam_preconditioner: {name} must be a number, got {value!r}") from None
    ok, allowed = (0 <= v < 1, "a number in [0, 1)") if rate else (0 <= v < float("inf"), "a finite number >= 0")
    if not ok:
        raise ValueError(f"adam_preconditioner: {name}={value!r} is not allowed; need {allowed}")
    return v


def find_adam_state(inner_state) -> optax.ScaleByAdamState:
    """The one ``optax.ScaleByAdamState`` (``count``, ``mu``, ``nu``) inside an optimiser state, wherever it sits
    (``optax.chain``, ``inject_hyperparams``, ``masked``, ``quotient_sgd.optim.horizontal`` ...).

    Raises:
        ValueError: none, or more than one (e.g. ``optax.multi_transform`` with two Adams: their preconditioners
            cover different parameters; pass a ``preconditioner`` function of your own).
    """
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    found = [x for x in jax.tree.leaves(inner_state, is_leaf=is_adam) if is_adam(x)]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise ValueError(
            f"adam_preconditioner: the optimiser state holds {what} optax.ScaleByAdamState (exactly one is needed: "
            f"the state of optax.adam / adamw / scale_by_adam); for another adaptive optimiser pass "
            f"quotient_trajectory(preconditioner=...) a function inner_state -> diag(P) of your own")
    return found[0]


def adam_preconditioner(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                        eps_root: float = 0.0) -> Callable[[Any], Any]:
    """Adam's diagonal preconditioner as a pure function ``inner_state -> diag(P)`` (a pytree like the
    parameters), for :func:`quotient_sgd.optim.quotient_trajectory` ``(hessian_at=(..., "preconditioned"),
    preconditioner=adam_preconditioner(...))``.

    ``P = (1 - b1^t) (sqrt(nu / (1 - b2^t) + eps_root) + eps)``, with ``t`` (``count``) and ``nu`` of the one
    ``optax.ScaleByAdamState`` in the state (:func:`find_adam_state`).  Given the state *after* an update (what
    ``quotient_trajectory`` passes: the wrapped optimiser's state once it has taken step ``k``), ``P`` is exactly
    the preconditioner that step ``k`` divided by (``nu`` already holds ``g_k^2``, ``t = k + 1``), and the best
    estimate of the next step's, which differs by one more EMA update of ``nu``.  ``eta P^-1 m`` is then optax's
    step: ``eta m_hat / (sqrt(v_hat + eps_root) + eps)``.

    ``b1, b2, eps, eps_root`` must be those of the optimiser (``optax.adam`` / ``adamw`` defaults here): the
    state does not hold them, except those injected by an ``optax.inject_hyperparams`` around the Adam
    (``inject_hyperparams(optax.adam)(learning_rate=1e-3, b2=0.99)``), which are read from it and take precedence,
    so that a sweep over them (:func:`~quotient_sgd.optim.set_hyperparams`) gets each member's own ``P``.
    Nesterov Adam (``nesterov=True``, ``optax.nadam``; another ``m_hat``) and AdamW's decoupled weight decay
    (``eta wd theta`` beside the preconditioned step) have the same ``P``: they move the edge, not the
    preconditioner (:func:`quotient_sgd.diagnostics.adam_edge` ``(b1, decay=eta * wd,
    nesterov=...)``).  Parameters that the Adam state does not cover (a partial ``optax.masked``) make it raise:
    their step has no such ``P``.  ``optax.adamax``, ``optax.yogi`` and ``optax.radam`` keep an
    ``optax.ScaleByAdamState`` too but divide by another ``P`` (an infinity norm, no bias correction, a
    rectification), which their state does not tell apart: pass a ``preconditioner`` of your own for them.

    Raises:
        ValueError / TypeError: a decay rate outside ``[0, 1)``, ``eps`` or ``eps_root`` negative or not finite;
            at call time, a state without exactly one ``ScaleByAdamState``.
    """
    b1 = _check_number("b1", b1, rate=True)
    b2 = _check_number("b2", b2, rate=True)
    eps = _check_number("eps", eps, rate=False)
    eps_root = _check_number("eps_root", eps_root, rate=False)

    given = {"b1": b1, "b2": b2, "eps": eps, "eps_root": eps_root}

    def preconditioner(inner_state):
        st = find_adam_state(inner_state)
        hp = _injected_around(inner_state, st)
        c1, c2, e, e_root = (hp.get(k, v) for k, v in given.items())
        if any(isinstance(x, optax.MaskedNode) for x in
               jax.tree.leaves(st.nu, is_leaf=lambda x: isinstance(x, optax.MaskedNode))):
            raise ValueError("adam_preconditioner: the Adam state covers only part of the parameters (optax.masked "
                             "with a partial mask); the others are not preconditioned by it.  Pass "
                             "quotient_trajectory(preconditioner=...) a function giving diag(P) for every "
                             "parameter")

        def one(nu):  # in the dtype of nu, at least float32 (widen)
            dt = nu.dtype
            t = jnp.asarray(st.count).astype(dt)
            bc1 = 1 - jnp.power(jnp.asarray(c1, dt), t)
            bc2 = 1 - jnp.power(jnp.asarray(c2, dt), t)
            return bc1 * (jnp.sqrt(nu / bc2 + jnp.asarray(e_root, dt)) + jnp.asarray(e, dt))

        return jax.tree.map(one, widen(st.nu))

    return preconditioner


def _injected_around(inner_state, adam_state) -> dict:
    """The values of ``b1``, ``b2``, ``eps``, ``eps_root`` that an ``optax.inject_hyperparams`` around
    ``adam_state`` holds (the innermost one that has each), i.e. those the Adam step used."""
    from ._spec import _inject_states

    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    out = {}
    for s in _inject_states(inner_state):
        if any(x is adam_state for x in jax.tree.leaves(s.inner_state, is_leaf=is_adam)):
            out.update({k: v for k, v in s.hyperparams.items() if k in ("b1", "b2", "eps", "eps_root")})
    return out
