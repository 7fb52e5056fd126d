"""Optimiser descriptors for the charge-drift prediction, and access to injected hyperparameters."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

#: A hyperparameter value: a number / array, the name of an ``optax.inject_hyperparams`` hyperparameter
#: (read from the optimiser state at every step, so it can be vmapped or changed without recompiling), or a
#: schedule ``count -> value`` evaluated at the wrapper's step count (refused with optimisers that skip steps,
#: ``optax.MultiSteps`` / ``apply_if_finite``: their own count lags it; inject the schedule there).
Hyper = Union[float, jax.Array, str, Callable[[jax.Array], Any]]


def check_wrapped(name: str, tx, group) -> None:
    """``TypeError`` naming the argument when ``tx`` is not an Optax transformation or ``group`` not a symmetry
    group (``model.symmetries()``): the wrappers would otherwise fail at the first update, far from the cause."""
    from ..symmetry import Group

    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(f"{name}: tx must be an optax.GradientTransformation (e.g. optax.sgd(0.1)), got {tx!r}")
    if not isinstance(group, Group):
        raise TypeError(f"{name}: group must be a quotient_sgd.symmetry.Group (e.g. model.symmetries()), got "
                        f"{group!r}")


def accepted_extra_args(update: Callable, extra_args: dict) -> dict:
    """The entries of ``extra_args`` that ``update`` (an optax ``update(updates, state, params, **extra_args)``)
    accepts: all of them when it takes ``**kwargs``, else those it names as keyword arguments.  optax's convention is
    that an extra-args-aware transformation takes and ignores the extra arguments it does not use, but some do not
    (``optax.contrib.sam``'s update names ``grad_fn`` alone): handed the ones :func:`~quotient_sgd.optim.train` and
    the wrappers pass (``value``, ``loss_fn`` ...), they failed with a bare "got an unexpected keyword argument
    'value'".  An update whose signature cannot be read gets them all."""
    import inspect

    try:
        params = inspect.signature(update).parameters.values()
    except (TypeError, ValueError):
        return dict(extra_args)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(extra_args)
    named = {p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    return {k: v for k, v in extra_args.items() if k in named}


def with_extra_args(tx) -> optax.GradientTransformationExtraArgs:
    """``tx`` as an extra-args-aware transformation that hands its ``update`` the extra arguments it accepts
    (:func:`accepted_extra_args`).  ``optax.with_extra_args_support`` drops every extra argument of a transformation
    not typed ``GradientTransformationExtraArgs``, also where its ``update`` takes ``**extra_args`` and forwards them:
    ``optax.MultiSteps`` (the object, or its ``gradient_transformation()``), a hand-written
    ``optax.GradientTransformation``.  Around ``optax.lbfgs`` that failed with a bare "missing 3 required keyword-only
    arguments: 'value', 'grad', and 'value_fn'", around a :func:`quotient_trajectory` with ``hessian_every`` with its
    "needs the extra argument loss_fn", though :func:`train` passed them."""
    if isinstance(tx, optax.GradientTransformationExtraArgs):
        return tx

    def update(updates, state, params=None, **extra_args):
        return tx.update(updates, state, params, **accepted_extra_args(tx.update, extra_args))

    return optax.GradientTransformationExtraArgs(tx.init, update)


def check_period(owner: str, name: str, value, *, optional: bool = False) -> int | None:
    """``value`` as a Python ``int`` (``None`` kept when ``optional``); ``ValueError`` naming the argument unless it is
    an integer ``>= 1``: a float, a bool or a string period would otherwise be accepted (``True`` as ``1``) or fail
    inside the first traced step with an unrelated promotion error.  A NumPy integer (``np.int64(10)``, e.g. read
    from an array of settings) is returned as the ``int`` it holds: kept as it was, ``count % every`` of the int32
    step counter with it failed under x64 with strict dtype promotion (``TypePromotionError: int32, int64``)."""
    import numbers

    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        allowed = "None (off) or an integer >= 1" if optional else "an integer >= 1"
        raise ValueError(f"{owner}: {name} must be {allowed}, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class SGDSpec:
    """What :func:`~quotient_sgd.optim.quotient_trajectory` must know about an SGD-family optimiser to predict
    the charge drift (THEORY section 2; the recursion is in :func:`quotient_sgd.observables.predict_charge_drift`).

    The optimiser it describes makes the update ``Delta = -eta (d + weight_decay * theta)`` with
    ``m+ = momentum * m + g + coupled_weight_decay * theta`` and ``d = m+`` (heavy ball) or
    ``d = g + coupled_weight_decay * theta + momentum * m+`` (``nesterov=True``), i.e. for example

    - ``optax.sgd(eta, momentum=beta, nesterov=...)``: ``SGDSpec(eta, momentum=beta, nesterov=...)``;
    - decoupled weight decay ``optax.chain(optax.trace(beta), optax.add_decayed_weights(lam), optax.scale(-eta))``
      or, without momentum, ``optax.chain(optax.add_decayed_weights(lam), optax.sgd(eta))``:
      ``SGDSpec(eta, weight_decay=lam, momentum=beta)`` (without momentum coupled and decoupled coincide);
    - coupled weight decay ``optax.chain(optax.add_decayed_weights(lam), optax.sgd(eta, momentum=beta))``:
      ``SGDSpec(eta, coupled_weight_decay=lam, momentum=beta)``;
    - injected: ``optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)`` with
      ``SGDSpec("learning_rate", momentum="momentum")``.

    Clipping inside the chain is fine when it rescales the whole gradient by one factor
    (``optax.clip_by_global_norm``): the clipped gradient stays orthogonal to the symmetry generators, and the
    prediction uses the actual update.  The clip must come before the weight decay (``optax.chain(
    optax.clip_by_global_norm(c), optax.add_decayed_weights(lam), optax.sgd(eta, momentum=beta))``, exact): placed
    after it, as in ``optax.chain(optax.add_decayed_weights(lam), optax.clip_by_global_norm(c), optax.sgd(eta))``,
    it rescales the decayed gradient ``g + lam theta``, so whenever it is active the decay applied is ``s lam`` with
    that step's clip factor ``s``, not ``lam`` (measured: the prediction off by up to 28 times the drift); such a
    chain has no spec, and its state does not show the order.  A clip after the momentum (``optax.chain(
    optax.trace(beta), optax.clip_by_global_norm(c), optax.scale(-eta))``) rescales the momentum's step, not the
    gradient, which no spec describes either (the prediction was 49% off, 80 times with Nesterov); there the
    optimiser's own momentum shows it: with momentum (``beta != 0``) and one ``optax.trace`` state shaped like the
    parameters, every step's update is compared with the spec's ``-eta (d + weight_decay * w)``, ``d`` the momentum
    held (heavy ball) or ``(1 + beta) m_{k+1} - beta m_k`` (Nesterov), to the square root of the machine epsilon,
    and from the first step where they differ (the clip acting; or a spec whose learning rate, decoupled decay or
    Nesterov momentum is not the optimiser's) ``charge_drift_predicted`` is NaN: its cross term is lost for the
    later steps too.  So it is from the first step where the momentum's increment ``m_{k+1} - beta m_k -
    coupled_weight_decay * w`` has a nonzero charge linear term ``<grad Q(theta_k), .>`` (a Jacobian-vector product
    of the charges, to the square root of the machine epsilon): a transform before the momentum that changes the
    gradient other than by one global factor (``optax.centralize``, a per-leaf scaling, a per-coordinate clip: the
    prediction was 197% off with ``optax.centralize``), or a heavy-ball spec whose momentum or coupled decay is not
    the optimiser's (told apart from the second step; its update alone is the momentum held).  An optimiser holding
    several momentum traces shaped like the parameters (``optax.chain(optax.trace(0.9), optax.trace(0.5), ...)``,
    23% off) is refused at ``init`` with a spec.  (A heavy-ball spec whose constant learning rate is off by a
    constant factor, without decays, predicted the drift exactly, the identity being invariant under it; it is NaN
    now, as the spec is not the optimiser's.)  Clipping per coordinate or per leaf (``optax.clip``,
    ``optax.clip_by_block_rms``) does not keep that orthogonality: the charges then drift by a term the identity does
    not contain (the prediction can be off by more than 100%), and such an optimiser has no spec (the prediction is
    NaN from the first step the clip acts, as above and below).  Without momentum (a spec of momentum 0) the step
    ``Delta`` itself is checked: the identity holds exactly iff ``Delta + eta (weight_decay + coupled_weight_decay)
    w`` has no charge linear term (one Jacobian-vector product of the charges, to the square root of the machine
    epsilon), and from the first step where it has one ``charge_drift_predicted`` is NaN: an optimiser with momentum
    described by a spec without it (``optax.sgd(eta, momentum=0.9)`` with ``SGDSpec(eta)`` was predicted up to 95%
    of a step's drift off, silently), a per-coordinate or per-leaf scaling (a clip, ``optax.centralize``, sign
    descent), a decay other than the spec's.  A global-norm clip, ``optax.MultiSteps`` / ``optax.apply_every`` (sums
    of gradients taken at the same point), a Polyak step size and, without decays, a learning rate off by a constant
    factor are SGD steps the identity describes exactly (it does not depend on the factor then), and stay finite.
    The learning rate and the weight decay must be the ones applied:
    ``optax.contrib.reduce_on_plateau`` chained after the optimiser (as optax's examples place it) rescales the
    step, i.e. the learning rate, at each reduction, which the spec does not see (the prediction 140% off after the
    first one, not refused: its state does not show where it sits; with momentum the update then differs from the
    momentum held, and the prediction is NaN from the first reduction, as for a clip after the momentum above, and so
    it is without momentum when the spec has a weight decay; without momentum and decays the identity does not depend
    on the learning rate, and stays exact);
    chained before, it rescales the gradient alone, which the heavy-ball identity without coupled decay tolerates
    exactly.  One spec describes one SGD acting on every parameter: an ``optax.multi_transform`` or ``optax.masked``
    that gives groups of parameters different learning rates or momenta (kernels at 0.1, biases at 0.3; momentum 0.9
    on the biases alone) has no spec, and is not refused (the states do not hold the learning rates): measured,
    ``SGDSpec(0.1)`` predicted those drifts 156% and 170% off.  Every field is a :data:`Hyper`; ``nesterov`` is
    static.  A spec for an optimiser whose state shows that it is not SGD (an Adam, RMSProp, Adagrad, Lion, LAMB,
    Adafactor, line-search, gradient-noise or optimistic-gradient state anywhere in it, or one of optax.contrib's
    adaptive optimisers: Prodigy, D-Adaptation, DoG, Mechanic, COCOB, Momo, schedule-free, Sophia, Muon, SAM ...) is
    refused by ``quotient_trajectory`` at ``init``: give those no spec, or wrap them in
    :func:`~quotient_sgd.optim.horizontal`.  Optimisers whose state does not show it are not recognised at ``init``;
    the per-step checks above make the prediction NaN for sign descent (``optax.sign_sgd``, ``optax.signum``) and
    ``optax.fromage`` with a spec of momentum 0 and for ``optax.lars`` (a trust ratio before a plain momentum), all
    from the first step (float64 MLP), while ``optax.polyak_sgd`` (a plain gradient step of a varying size) is
    predicted exactly; ``optax.signum`` with a spec with momentum (its EMA is not an ``optax.trace``: nothing to
    check the step against) predicts the drift of an SGD step it does not take (measured 100% off): give it no
    spec.

    :func:`quotient_sgd.diagnostics.shock_aware_lr` around the optimiser (``shock_aware_lr(optax.sgd(eta, ...))``:
    the spec describes the wrapped SGD) multiplies the whole update by the scale ``s`` it applies at each step, so the
    step is that of the learning rate ``eta * s``: the prediction (and the shock / fold numbers, the temperature)
    use it, read from the state (exact; a spec taken as it is was 19-89% off).  A ``shock_aware_lr`` that scales
    only some parameters (inside ``optax.masked`` / ``multi_transform``) is refused with a spec.

    A step that the optimiser skips, leaving parameters and momentum as they are (``optax.apply_if_finite`` on a
    non-finite gradient, ``optax.MultiSteps`` while it accumulates; the spec then describes the wrapped SGD), is
    recognised by its update of exact zeros at a nonzero learning rate: its predicted drift is zero and the
    momentum's cross term is carried through it, so the prediction stays exact (up to the rounding of
    ``MultiSteps``' accumulator, float32 by default).  Such an optimiser's schedules run on its own count of the
    steps it applied, not on the wrapper's count of all steps, so a field given as a schedule is refused there
    (``quotient_trajectory`` raises at ``init``): inject the schedule and name it instead,
    ``optax.inject_hyperparams(optax.sgd)(learning_rate=schedule)`` with ``SGDSpec("learning_rate")``.
    ``optax.apply_every(k)`` sums ``k`` steps of what comes before it: with plain SGD the prediction is exact (the
    parameters do not move while it accumulates), but a spec with momentum or a weight decay is refused at ``init``
    (a momentum fed by its sums of earlier gradients, or a sum of ``k`` decayed steps, was predicted 17-64% off,
    silently).

    The weight decays act on every parameter unless ``decay_mask`` restricts them, as optax's ``mask``: a pytree
    of booleans with the structure of the parameters (or a prefix of it), or a function ``params -> such a
    pytree``, ``True`` where the decays act.  For example no decay on biases::

        mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
        tx = optax.chain(optax.add_decayed_weights(lam, mask=mask), optax.sgd(eta))
        spec = SGDSpec(eta, weight_decay=lam, decay_mask=mask)

    A masked decay moves a charge by a bilinear term of ``theta`` and its decayed part rather than by ``lam * Q``;
    the prediction then follows the masked recursion of :func:`quotient_sgd.observables.predict_charge_drift`.
    (One mask serves both decays; an optimiser with differently masked coupled and decoupled decays has no spec.)
    """

    learning_rate: Hyper
    weight_decay: Hyper = 0.0
    momentum: Hyper = 0.0
    nesterov: bool = False
    coupled_weight_decay: Hyper = 0.0
    decay_mask: Any = None

    def __post_init__(self):
        if self.decay_mask is not None and not callable(self.decay_mask):
            bad = [x for x in jax.tree.leaves(self.decay_mask)
                   if not (isinstance(x, bool) or getattr(x, "dtype", None) == jnp.bool_)]
            if bad or not jax.tree.leaves(self.decay_mask):
                raise TypeError(f"SGDSpec: decay_mask must be None, a pytree of booleans (True where the weight "
                                f"decay acts) or a function params -> such a pytree, got {self.decay_mask!r}")
        if not isinstance(self.nesterov, (bool, np.bool_)):
            raise TypeError(f"SGDSpec: nesterov must be True or False (it is static: it selects the recursion), got "
                            f"{self.nesterov!r}")
        for f in ("learning_rate", "weight_decay", "momentum", "coupled_weight_decay"):
            v = getattr(self, f)
            # None, a bool or any other object failed only inside the first traced step, far from the cause
            if isinstance(v, (bool, np.bool_)) or not (isinstance(v, (numbers.Real, str, jax.Array, np.ndarray))
                                                       or callable(v)):
                raise TypeError(f"SGDSpec: {f}={v!r} is not allowed; need a finite number >= 0, the name of an "
                                f"injected hyperparameter, or a schedule count -> value")
            if isinstance(v, (jax.Array, np.ndarray)) and jnp.ndim(v) != 0:
                # one spec describes one optimiser: a vector broadcast against the charges (a wrong prediction, or
                # an unrelated shape error inside the first traced step)
                raise ValueError(f"SGDSpec: {f} must be a scalar, got an array of shape {jnp.shape(v)}; to sweep "
                                 f"it, inject it (optax.inject_hyperparams), name it here and vmap over "
                                 f"set_hyperparams")
            if isinstance(v, (jax.Array, np.ndarray)) and not isinstance(v, jax.core.Tracer):
                # a concrete array is held to what the number it holds would be: np.array(nan), jnp.array(-0.1),
                # a complex, string or bool array were accepted (refused as Python values)
                # (jnp.issubdtype: NumPy does not count bfloat16 as floating, and jnp.bfloat16(0.1) was refused as
                # "need a finite number >= 0")
                dtype = np.asarray(v).dtype
                if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)) or not (
                        0 <= float(v) < float("inf")):
                    raise ValueError(f"SGDSpec: {f}={v!r} is not allowed; need a finite number >= 0 (or the name of "
                                     f"an injected hyperparameter, or a schedule)")
            if isinstance(v, numbers.Real) and not (0 <= v < float("inf")):
                raise ValueError(f"SGDSpec: {f}={v!r} is not allowed; need a finite number >= 0 (or the name of an "
                                 f"injected hyperparameter, or a schedule)")

    def mask_for(self, params):
        """The decay mask for ``params`` (``None``: every parameter is decayed)."""
        if self.decay_mask is None:
            return None
        return self.decay_mask(params) if callable(self.decay_mask) else self.decay_mask

    def resolve(self, opt_state, count) -> dict[str, jax.Array]:
        """The numeric hyperparameters at this step (``opt_state``: the wrapped optimiser's state after its
        update, where ``inject_hyperparams`` stores the values it just used)."""
        return {
            f: resolve_hyper(getattr(self, f), opt_state, count, f)
            for f in ("learning_rate", "weight_decay", "momentum", "coupled_weight_decay")
        }


def _is_inject_state(x) -> bool:
    # optax.inject_hyperparams returns InjectStatefulHyperparamsState (optax >= 0.2.4), older InjectHyperparamsState
    return isinstance(x, tuple) and hasattr(x, "hyperparams") and hasattr(x, "inner_state") and hasattr(x, "count")


def _inject_states(opt_state) -> list:
    """The ``inject_hyperparams`` states in ``opt_state``, each followed by those nested in its ``inner_state``."""
    out = []
    for x in jax.tree.leaves(opt_state, is_leaf=_is_inject_state):
        if _is_inject_state(x):
            out += [x, *_inject_states(x.inner_state)]
    return out


def injected_hyperparams(opt_state) -> dict[str, jax.Array]:
    """All hyperparameters injected by ``optax.inject_hyperparams`` anywhere in ``opt_state``, also in one nested
    in another's inner state (outer first: a name injected twice reads the outer value)."""
    out: dict[str, jax.Array] = {}
    for s in _inject_states(opt_state):
        for k, v in s.hyperparams.items():
            out.setdefault(k, v)
    return out


def resolve_hyper(value: Hyper, opt_state, count, field: str = "value"):
    if isinstance(value, str):
        hp = injected_hyperparams(opt_state)
        if value not in hp:
            raise KeyError(
                f"SGDSpec.{field}={value!r}: no injected hyperparameter of that name in the optimiser state; "
                f"injected: {sorted(hp)}. Wrap the optimiser with optax.inject_hyperparams or pass a number."
            )
        return _real_scalar(hp[value], field, f"the injected hyperparameter {value!r} holds")
    if callable(value):
        try:
            out = value(count)
        except TypeError as e:
            raise TypeError(f"SGDSpec.{field}={value!r}: a schedule is called with one argument, the step count "
                            f"(an int32 scalar), and failed: {e}") from e
        return _real_scalar(out, field, f"the schedule {value!r} returned")
    return jnp.asarray(value)


def _real_scalar(out, field: str, what: str) -> jax.Array:
    """``out`` as an array, or an error naming the spec's field unless it is a real (integer or floating) scalar:
    a schedule returning a vector failed inside the prediction ("div got incompatible shapes for broadcasting:
    (6,), (2,)"), a string or None in JAX's conversion, naming neither; a complex value lost its imaginary part and
    a bool was taken as 0 / 1, silently (the fields' own values are refused so, SGDSpec)."""
    try:
        arr = jnp.asarray(out)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.dtype == jnp.bool_ or not (
            jnp.issubdtype(arr.dtype, jnp.integer) or jnp.issubdtype(arr.dtype, jnp.floating)):
        raise TypeError(f"SGDSpec.{field}: {what} {out!r}; need a real number")
    if arr.shape != ():
        raise ValueError(f"SGDSpec.{field}: {what} an array of shape {arr.shape}; need a scalar (one spec describes "
                         f"one optimiser: to sweep a hyperparameter, inject it, name it here and vmap over "
                         f"set_hyperparams)")
    return arr


def member_axes(opt_state):
    """``vmap`` axes for a sweep over copies of ``opt_state``, one per member: ``0`` for every leaf except the
    integer scalars (the step counters of optax and of the wrappers here), which every member shares.

    Keeping the counters unbatched keeps the periodic observables' ``lax.cond`` (``count % every``, the Hessian
    every ``K`` steps) a real branch under ``vmap``; with batched counters ``vmap`` turns it into a ``select`` of
    both branches, which evaluates the costly one at every step for every member (a 1000-step sweep of a
    64-128-128-10 MLP over three learning rates with the Hessian every 100 steps: 61 s).  Use the same axes to
    build the states and to map :func:`~quotient_sgd.optim.train`::

        axes = member_axes(tx.init(params))
        states = jax.vmap(lambda lr: set_hyperparams(tx.init(params), learning_rate=lr), out_axes=axes)(lrs)
        _, _, trajs = jax.vmap(lambda s: train(loss_fn, params, tx, data, opt_state=s, donate=False),
                               in_axes=(axes,))(states)

    (An integer-valued hyperparameter injected as a Python ``int`` is such a scalar too: inject floats to sweep
    them, :func:`set_hyperparams`.)"""
    def axis(x):  # arrays, or their jax.ShapeDtypeStruct
        dtype = x.dtype if hasattr(x, "dtype") else jnp.result_type(x)
        return None if len(jnp.shape(x)) == 0 and jnp.issubdtype(dtype, jnp.integer) else 0

    return jax.tree.map(axis, opt_state)


def _numeric_value(name: str, value) -> jax.Array:
    """``value`` as an array, or a ``TypeError`` naming the hyperparameter (a string failed inside JAX's
    conversion with "is not a valid JAX array type", naming neither)."""
    try:
        return jnp.asarray(value)
    except TypeError:
        raise TypeError(f"set_hyperparams: {name}={value!r} is not allowed; need a real number (or an array of them "
                        f"under vmap)") from None


def set_hyperparams(opt_state, **values):
    """A copy of ``opt_state`` with the named ``optax.inject_hyperparams`` values replaced (in every injected
    state that has them), cast to the dtype stored there; a float for a hyperparameter that was injected as an
    integer (``momentum=0``) is a ``ValueError`` rather than a silent truncation, and so is a value of another shape
    (a vector of learning rates for the scalar one: vmap over them).  Use it to build a vmapped sweep without
    recompiling::

        tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
        states = jax.vmap(lambda lr: set_hyperparams(tx.init(params), learning_rate=lr))(lrs)

    (with ``out_axes=member_axes(tx.init(params))`` when ``tx`` records periodic observables:
    :func:`member_axes`).  A hyperparameter injected as a schedule (``learning_rate=optax.cosine_decay_schedule(...)``)
    is recomputed from the schedule at every step, so a value set here would change nothing (every member of a sweep
    ran the schedule): that is a ``ValueError`` naming it.  Sweep a schedule's parameters by injecting them as
    numbers and building the schedule inside the optimiser.
    """
    is_inj = _is_inject_state
    found = set()
    scheduled = set()

    def fix(x):
        if not is_inj(x):
            return x
        hp = dict(x.hyperparams)
        for k, v in values.items():
            if k in hp and k in (getattr(x, "hyperparams_states", None) or {}):
                # optax.inject_hyperparams recomputes it from its schedule at every update, over what is stored
                scheduled.add(k)
            elif k in hp:
                old, new = jnp.asarray(hp[k]), _numeric_value(k, v)
                if (new.dtype == jnp.bool_) != (old.dtype == jnp.bool_) or (
                        jnp.issubdtype(new.dtype, jnp.complexfloating)
                        and not jnp.issubdtype(old.dtype, jnp.complexfloating)):
                    # a bool was stored as 1.0 / 0.0 (learning_rate=True trained at 1.0), a complex value lost its
                    # imaginary part, both silently
                    raise ValueError(f"set_hyperparams: {k} is stored as {old.dtype}, got {v!r} of dtype "
                                     f"{new.dtype}; pass a real number (or an array of them under vmap)")
                if new.shape != old.shape:
                    # a vector of values for a scalar hyperparameter broadcast against the parameters in the update:
                    # per-column learning rates, or an unrelated shape error, instead of a sweep
                    raise ValueError(
                        f"set_hyperparams: {k} is stored with shape {old.shape}, got a value of shape {new.shape}; "
                        f"one state holds one value: to sweep several, map over them, "
                        f"jax.vmap(lambda v: set_hyperparams(state, {k}=v))(values)")
                if jnp.issubdtype(old.dtype, jnp.integer) and not jnp.issubdtype(new.dtype, jnp.integer):
                    raise ValueError(
                        f"set_hyperparams: {k} was injected as an integer ({old.dtype}: a Python int such as "
                        f"{k}=0 or 1), so the {new.dtype} value {v!r} would be truncated to it; inject a float "
                        f"({k}=0.0 / 1.0)"
                    )
                hp[k] = new.astype(old.dtype)
                found.add(k)
        return x._replace(hyperparams=hp, inner_state=jax.tree.map(fix, x.inner_state, is_leaf=is_inj))

    out = jax.tree.map(fix, opt_state, is_leaf=is_inj)
    if scheduled:
        raise ValueError(
            f"set_hyperparams: {sorted(scheduled)} injected as a schedule (optax.inject_hyperparams recomputes it "
            f"from the schedule at every step), so the value set would change nothing; inject the schedule's "
            f"parameters as numbers and build the schedule inside the optimiser, e.g. optax.inject_hyperparams("
            f"lambda peak: optax.sgd(optax.cosine_decay_schedule(peak, 1000)))(peak=0.1) with set_hyperparams(state, "
            f"peak=...)")
    missing = set(values) - found
    if missing:
        raise KeyError(
            f"set_hyperparams: {sorted(missing)} not injected in the optimiser state; injected: "
            f"{sorted(injected_hyperparams(opt_state))}"
        )
    return out
