"""The scan-based training loop: one jitted ``lax.scan`` over steps, vmap-able over seeds and hyperparameters."""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._gauge import gauge_fix_elements
from ._spec import accepted_extra_args, with_extra_args
from ._trajectory import _find


def _objective(loss_fn, has_aux, params, model_state, batch):
    """``(loss, (aux, new_model_state))`` whatever the user's convention; a return value that does not follow the
    convention the arguments announce is a ``ValueError`` naming it (rather than JAX's error from inside grad)."""
    if model_state is not None:
        # Rebuild the state's containers at the current trace level: NNX forbids mutating a Variable created at
        # an outer trace (the scan carry) from inside jax.grad, which merge-then-update patterns would do.
        model_state = jax.tree.map(lambda a: a, model_state)
        out = loss_fn(params, model_state, batch)
        if not (_is_pair(out) and _is_pair(out[1])):
            raise ValueError(
                "train(model_state=...): loss_fn(params, model_state, batch) must return "
                f"(loss, (aux, new_model_state)) (aux may be None), got {_describe(out)}"
            )
        loss, (aux, new_ms) = out
        _check_new_model_state(model_state, new_ms)
        return _scalar_loss(loss), (aux, new_ms)
    out = loss_fn(params, batch)
    if has_aux:
        if not _is_pair(out):
            raise ValueError(f"train(has_aux=True): loss_fn(params, batch) must return (loss, aux), got "
                             f"{_describe(out)}; pass has_aux=False for a loss_fn that returns the loss alone")
        loss, aux = out
    else:
        if isinstance(out, (tuple, list)):
            raise ValueError(f"train: loss_fn(params, batch) returned {_describe(out)}; pass has_aux=True for a "
                             f"loss_fn that returns (loss, aux)")
        loss, aux = out, None
    return _scalar_loss(loss), (aux, None)


def _check_new_model_state(model_state, new_ms) -> None:
    """``ValueError`` unless ``new_ms`` has the structure, shapes and dtypes of ``model_state``: it is the scan's
    carry, and JAX's error named only "carry[2]" (e.g. ``nnx.state(model)`` returned, with the parameters, in place
    of the batch statistics alone, or statistics cast to another dtype)."""
    want, got = jax.tree.structure(model_state), jax.tree.structure(new_ms)
    if want != got:
        raise ValueError(
            f"train(model_state=...): the new_model_state returned by loss_fn must have the structure of model_state "
            f"(the non-Param state alone, e.g. nnx.split(model, nnx.Param, nnx.BatchStat)[2]):\n  model_state     "
            f"{want}\n  new_model_state {got}")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(model_state), jax.tree.leaves(new_ms)):
        if not (hasattr(a, "dtype") and hasattr(b, "dtype")):
            continue  # a Python number: its dtype is whatever the carry makes of it
        if jnp.shape(a) != jnp.shape(b) or a.dtype != b.dtype:
            raise ValueError(
                f"train(model_state=...): new_model_state{jax.tree_util.keystr(path)} is "
                f"{jnp.result_type(b)}{list(jnp.shape(b))} but model_state holds {jnp.result_type(a)}"
                f"{list(jnp.shape(a))} there; return the new state with the shapes and dtypes of the old")


def _is_pair(x) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2


def _describe(x) -> str:
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)} ({', '.join(_describe(y) for y in x)})"
    shape = getattr(x, "shape", None)
    return f"an array of shape {tuple(shape)}" if shape is not None else type(x).__name__


def _scalar_loss(loss):
    if jnp.shape(loss) != ():
        raise ValueError(f"train: the loss returned by loss_fn must be a scalar, got shape {jnp.shape(loss)} "
                         f"(average per-example losses, e.g. jnp.mean)")
    return loss


@functools.partial(
    jax.jit,
    static_argnames=("loss_fn", "tx", "batch_fn", "num_steps", "has_aux", "example_loss_fn", "unroll",
                     "act_on_model_state"),
    donate_argnames=("params", "opt_state", "model_state"),
)
def _run_donated(params, opt_state, model_state, data, key, start_step, **static):
    return _run(params, opt_state, model_state, data, key, start_step, **static)


@functools.partial(
    jax.jit,
    static_argnames=("loss_fn", "tx", "batch_fn", "num_steps", "has_aux", "example_loss_fn", "unroll",
                     "act_on_model_state"),
)
def _run_kept(params, opt_state, model_state, data, key, start_step, **static):
    return _run(params, opt_state, model_state, data, key, start_step, **static)


def _run(params, opt_state, model_state, data, key, start_step, *, loss_fn, tx, batch_fn, num_steps, has_aux,
         example_loss_fn, unroll, act_on_model_state):
    tx = with_extra_args(tx)
    steps = start_step + jnp.arange(num_steps, dtype=jnp.int32)
    has_q = bool(_find(opt_state))

    def body(carry, xs):
        params, opt_state, model_state = carry
        step, batch = xs
        if batch_fn is not None:
            batch = batch_fn(step, jax.random.fold_in(key, step))

        def obj(p):
            return _objective(loss_fn, has_aux, p, model_state, batch)

        (loss, (aux, new_ms)), grads = jax.value_and_grad(obj, has_aux=True)(params)

        def batch_loss(p):
            return obj(p)[0]

        def value_fn(p, *, loss_fn=None, example_loss_fn=None, obj_fn=None):
            # optax's line searches (optax.lbfgs) pass the extra arguments they do not consume on to value_fn and
            # refuse any that it does not name: the others this loop passes are named here and ignored
            del loss_fn, example_loss_fn, obj_fn
            return batch_loss(p)

        # optax's names: value / grad / value_fn (optax.lbfgs's line search), obj_fn (optax.contrib.sophia);
        # loss_fn / example_loss_fn: quotient_trajectory's Hessian and noise
        extra = {"value": loss, "grad": grads, "value_fn": value_fn, "obj_fn": batch_loss, "loss_fn": batch_loss}
        if example_loss_fn is not None:
            extra["example_loss_fn"] = lambda p: example_loss_fn(p, batch)
        # only the extra arguments tx.update accepts (optax.contrib.sam's names grad_fn alone)
        prev_state = opt_state
        updates, opt_state = tx.update(grads, opt_state, params, **accepted_extra_args(tx.update, extra))
        params = optax.apply_updates(params, updates)
        if model_state is not None:
            new_ms = _follow_gauge_fix(opt_state, new_ms, act_on_model_state, prev_state)
        out: dict[str, Any] = {}
        if has_q:
            out.update(_find(opt_state)[0].observables)
        out["loss"] = loss
        if has_aux:
            out["aux"] = aux
        return (params, opt_state, new_ms if model_state is not None else None), out

    xs = (steps, None if batch_fn is not None else data)
    (params, opt_state, model_state), traj = jax.lax.scan(
        body, (params, opt_state, model_state), xs, length=num_steps, unroll=unroll)
    return params, opt_state, model_state, traj


def _follow_gauge_fix(opt_state, model_state, act: Callable | None, prev_state=None):
    """``model_state`` moved by the canonical elements the ``gauge_fix`` transforms in ``opt_state`` applied to
    the parameters at this step (in their order; none: unchanged).  ``prev_state``: the optimiser state before the
    step, so that a ``gauge_fix`` that did not run at it (inside ``optax.MultiSteps`` while it accumulates), whose
    state still holds the last step's element, does not move the model state again."""
    for element, applied in gauge_fix_elements(opt_state, prev_state):
        if act is None:
            raise ValueError(
                "train: tx contains gauge_fix, which moves the parameters to their canonical representative, and "
                "model_state is given: pass act_on_model_state=(element, model_state) -> model_state, the action "
                "of the group on that state (functools.partial(model.act_on_batch_stats, group) for a BatchNorm "
                "CNN; lambda g, s: s when the group does not act on it)")
        model_state = jax.lax.cond(applied, lambda s, e=element: act(e, s), lambda s: s, model_state)
    return model_state


def _check_batch_fn(batch_fn) -> None:
    """``TypeError`` naming ``data`` when the ``batch_fn`` given there cannot be called as ``batch_fn(step, key)``
    (e.g. ``lambda step: ...``): it failed inside the traced loop with a bare "<lambda>() takes 1 positional argument
    but 2 were given", naming neither ``train`` nor the convention.  A function whose signature cannot be read is
    taken as it is."""
    import inspect

    try:
        sig = inspect.signature(batch_fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(0, None)
    except TypeError as e:
        raise TypeError(f"train: data=batch_fn is called as batch_fn(step, key) (step: the global step, an int32 "
                        f"scalar; key: fold_in(key, step), which a batch_fn that needs no randomness ignores), but "
                        f"{batch_fn!r} cannot be: {e}") from None


def _is_prng_key(key) -> bool:
    """A typed key (``jax.random.key``) or a raw ``uint32`` key (``jax.random.PRNGKey``)."""
    dtype = getattr(key, "dtype", None)
    if dtype is None:
        return False
    return jnp.issubdtype(dtype, jax.dtypes.prng_key) or (dtype == jnp.uint32 and jnp.ndim(key) == 1)


def _check_one_key(key) -> None:
    """``ValueError`` unless ``key`` is one key: a typed key of shape ``()`` or the raw data of one (``uint32`` of the
    default implementation's key shape, ``(2,)`` for threefry).  A batch of keys (``jax.random.split(key, 2)``, meant
    for seeds) failed inside the scan in ``fold_in``, and raw data of another length with "invalid PRNG key data",
    naming neither ``train`` nor ``key``."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        ok, what = jnp.shape(key) == (), f"a key array of shape {jnp.shape(key)}"
    else:
        want = jax.random.key_data(jax.random.key(0)).shape
        ok, what = jnp.shape(key) == want, f"raw uint32 key data of shape {jnp.shape(key)} (one key's is {want})"
    if not ok:
        raise ValueError(f"train: key must be one PRNG key (jax.random.key(0): batch_fn receives fold_in(key, step)), "
                         f"got {what}; to run several seeds, jax.vmap train over the keys")


def _distinct_buffers(trees):
    """``trees`` with every array that occurs in them more than once (one ``jax.Array`` object in two places: an
    optimiser ``init`` that stores one zero array in two fields, as ``optax.lbfgs`` does, or that stores the
    parameters themselves) replaced by a copy after its first occurrence: XLA refuses to donate one buffer twice
    ("Attempt to donate the same buffer twice")."""
    seen: set[int] = set()

    def one(x):
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            if id(x) in seen:
                return jnp.copy(x)
            seen.add(id(x))
        return x

    return jax.tree.map(one, trees)


def _check_opt_state(tx, params, opt_state, error: Exception) -> None:
    """After the loop failed: a ``ValueError`` naming ``opt_state`` when its structure is not that of
    ``tx.init(params)`` (the state of the unwrapped optimiser, or of another chain, failed inside the first update
    with an unrelated ``AttributeError``); otherwise nothing (the caller re-raises ``error``)."""
    try:
        expected = jax.tree.structure(jax.eval_shape(tx.init, params))
    except Exception:
        return
    got = jax.tree.structure(opt_state)
    if got != expected:
        raise ValueError(
            f"train: opt_state does not have the structure of tx.init(params) (resume with the state that train or "
            f"tx.init returned for this tx, e.g. the quotient_trajectory-wrapped optimiser's, not the inner one's):"
            f"\n  expected {expected}\n  got      {got}"
        ) from error


def _check_arguments(loss_fn, tx, has_aux, donate, example_loss_fn, act_on_model_state) -> None:
    """``TypeError`` naming the argument of :func:`train` that has the wrong kind: a ``loss_fn`` or
    ``example_loss_fn`` that is not callable failed inside the traced loop with a bare "'float' object is not
    callable", a ``tx`` without ``init`` / ``update`` with an ``AttributeError``; ``has_aux`` / ``donate`` were read by
    their truth value, so ``donate="no"`` consumed the arrays passed in and ``has_aux="no"`` expected ``(loss, aux)``;
    an ``act_on_model_state`` that is not callable was accepted until a ``gauge_fix`` called it."""
    if not callable(loss_fn):
        raise TypeError(f"train: loss_fn must be a function (params, batch) -> loss (or (params, model_state, batch) "
                        f"-> (loss, (aux, new_model_state)) with model_state), got {loss_fn!r}")
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(f"train: tx must be an optax.GradientTransformation (e.g. quotient_trajectory(optax.sgd(0.1), "
                        f"group)), got {tx!r}")
    for name, flag in (("has_aux", has_aux), ("donate", donate)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"train: {name} must be True or False, got {flag!r}")
    for name, fn in (("example_loss_fn", example_loss_fn), ("act_on_model_state", act_on_model_state)):
        if fn is not None and not callable(fn):
            raise TypeError(f"train: {name} must be None or a function, got {fn!r}")


def train(
    loss_fn: Callable,
    params,
    tx: optax.GradientTransformation,
    data,
    *,
    num_steps: int | None = None,
    key=None,
    opt_state=None,
    start_step=0,
    has_aux: bool = False,
    model_state=None,
    example_loss_fn: Callable | None = None,
    donate: bool = True,
    unroll: int = 1,
    act_on_model_state: Callable | None = None,
):
    """Train with ``tx`` for ``num_steps`` steps in one jitted ``lax.scan``; returns
    ``(params, opt_state, trajectory)`` (``(params, opt_state, model_state, trajectory)`` when ``model_state`` is
    given).

    Args:
        loss_fn: ``loss_fn(params, batch) -> loss`` (``-> (loss, aux)`` with ``has_aux``); with ``model_state``
            (non-Param NNX state such as batch statistics): ``loss_fn(params, model_state, batch) ->
            (loss, (aux, new_model_state))``; the new model state is threaded to the next step.  Must be a
            hashable callable (a module-level function or a ``functools.partial`` of one is cached; a fresh
            lambda per call recompiles).
        params: the initial parameters (a pytree, e.g. the ``nnx.Param`` state of ``nnx.split``).
        tx: the optimiser, e.g. ``quotient_trajectory(optax.sgd(0.1), group)``.  Hyperparameters that a sweep
            varies belong in the state (``optax.inject_hyperparams``; :func:`set_hyperparams`), so new values
            do not recompile.  Every update gets the optax extra arguments ``value`` (the batch loss), ``grad``
            (its gradient), ``value_fn`` and ``obj_fn`` (``params -> loss`` on the step's batch; what
            ``optax.lbfgs`` and ``optax.contrib.sophia`` need), ``loss_fn`` (the same, for the Hessian of
            :func:`quotient_trajectory`) and, when given, ``example_loss_fn``.
        data: either a pytree of arrays whose leading axis indexes the steps of this call, or a pure
            ``batch_fn(step, key) -> batch`` evaluated inside the scan (``step`` is the global step
            ``start_step + i``, ``key = fold_in(key, step)``), so full-batch runs never copy the data per step.
        num_steps: the number of steps (default: the leading axis of ``data``; required with a ``batch_fn``).
        key: one PRNG key for ``batch_fn`` (default ``jax.random.key(0)``); for several seeds, ``jax.vmap`` train
            over a batch of keys.
        opt_state: resume from this optimiser state (default ``tx.init(params)``).
        start_step: the global index of the first step (an integer >= 0; the steps are int32, so
            ``start_step + num_steps <= 2**31``): a run in chunks (carrying ``params``, ``opt_state``,
            ``model_state`` and advancing ``start_step``) equals the unchunked run.
        example_loss_fn: ``(params, batch) -> (B,)`` per-example losses, passed on to the optimiser (the noise
            temperature of :func:`quotient_trajectory` with ``noise_every``).  It gets no ``model_state``: with
            batch statistics the examples of a batch are not independent (each one's loss depends on the
            others through the normalisation), so per-example gradients have no meaning there; a model whose
            state does not couple examples can close over it.
        donate: donate ``params`` / ``opt_state`` / ``model_state`` buffers to the loop (the arrays passed in are
            consumed; pass ``donate=False`` to keep using them).  Ignored under ``vmap`` / an outer ``jit`` (there
            the arrays the mapped function closes over are kept too).
        unroll: ``lax.scan`` unroll factor.
        act_on_model_state: ``(element, model_state) -> model_state``, the group's action on the model's
            non-parameter state; needed with ``model_state`` when ``tx`` contains :func:`gauge_fix`, whose
            re-gauging of the parameters the state then follows (its elements: :func:`gauge_fix_elements`).  For
            a BatchNorm CNN: ``functools.partial(model.act_on_batch_stats, group)`` (a hashable callable).

    Returns:
        ``trajectory``: ``{key: array stacked over steps}``: ``loss`` always, ``aux`` with ``has_aux``, and
        every observable of a :func:`quotient_trajectory` in ``tx`` (nested dicts for per-component ones).

    Runs unchanged under ``jax.vmap`` (over ``params`` / ``key`` for seeds, over ``opt_state`` for injected
    hyperparameters).
    """
    _check_arguments(loss_fn, tx, has_aux, donate, example_loss_fn, act_on_model_state)
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral)
                                  or num_steps < 0):
        raise ValueError(f"train: num_steps must be None (the data's leading axis) or an integer >= 0, got "
                         f"{num_steps!r}")
    if isinstance(start_step, bool) or not (isinstance(start_step, numbers.Integral) or (
            hasattr(start_step, "dtype") and jnp.issubdtype(start_step.dtype, jnp.integer)
            and jnp.ndim(start_step) == 0)):
        raise ValueError(f"train: start_step must be an integer (a Python int or an integer scalar array), got "
                         f"{start_step!r}")
    if callable(data) and not hasattr(data, "shape"):
        batch_fn, stacked = data, None
        if num_steps is None:
            raise ValueError("train(data=batch_fn, ...) needs num_steps")
        _check_batch_fn(batch_fn)
    else:
        batch_fn, stacked = None, data
        leaves = jax.tree.leaves(data)
        if not leaves:
            raise ValueError("train: data has no arrays; pass stacked batches or a batch_fn(step, key)")
        sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
        if len(sizes) != 1 or None in sizes:
            shapes = [jnp.shape(x) for x in leaves]
            raise ValueError(f"train: every array in data needs the same leading (step) axis, got shapes {shapes}")
        n = leaves[0].shape[0]
        if num_steps is None:
            num_steps = n
        elif num_steps != n:
            stacked = jax.tree.map(lambda x: x[:num_steps], data)
            if num_steps > n:
                raise ValueError(f"train: num_steps={num_steps} but data has only {n} stacked batches")
    if not isinstance(unroll, bool) and (not isinstance(unroll, numbers.Integral) or unroll < 0):
        raise ValueError(f"train: unroll must be an integer >= 0 or a bool (the lax.scan unroll factor), got "
                         f"{unroll!r}")
    if key is None:
        key = jax.random.key(0)
    elif not _is_prng_key(key):
        raise TypeError(f"train: key must be a PRNG key, e.g. jax.random.key(0) (batch_fn receives fold_in(key, "
                        f"step)), got {key!r}")
    else:
        _check_one_key(key)
    if not isinstance(start_step, jax.core.Tracer) and not 0 <= int(start_step) <= 2**31 - int(num_steps):
        # the steps are int32: start_step=2**31 raised a bare OverflowError, and 2**31 - 1 with two steps wrapped
        # the second step to -2**31, silently (batch_fn got it)
        raise ValueError(f"train: start_step must be >= 0 with start_step + num_steps <= 2**31 (the steps are "
                         f"int32), got start_step={start_step!r}, num_steps={num_steps}")
    for name, tree in (("params", params), ("opt_state", opt_state), ("model_state", model_state)):
        if any(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.is_deleted()
               for x in jax.tree.leaves(tree)):
            raise ValueError(
                f"train: {name} holds arrays that were donated to an earlier train call (donate=True, the default, "
                f"consumes them) and are deleted; use what that call returned, pass donate=False to keep the "
                f"inputs, or pass a copy (jax.tree.map(jnp.copy, {name}))"
            )
    if opt_state is None:
        opt_state = tx.init(params)
    # under vmap / jit (an argument or the default key is traced) nothing is donated: arrays that the mapped
    # function closes over (params shared by every seed of a vmap over keys) are concrete there, and were deleted
    donate = donate and not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(
        (params, opt_state, model_state, stacked, key, start_step)))
    if donate:
        params, opt_state, model_state = _distinct_buffers((params, opt_state, model_state))
    run = _run_donated if donate else _run_kept
    try:
        params, opt_state, model_state, traj = run(
            params, opt_state, model_state, stacked, key, jnp.asarray(start_step, jnp.int32),
            loss_fn=loss_fn, tx=tx, batch_fn=batch_fn, num_steps=int(num_steps), has_aux=has_aux,
            example_loss_fn=example_loss_fn, unroll=unroll, act_on_model_state=act_on_model_state,
        )
    except Exception as e:
        _check_opt_state(tx, params, opt_state, e)
        raise
    if model_state is not None:
        return params, opt_state, model_state, traj
    return params, opt_state, traj
