"""``quotient_trajectory``: an Optax wrapper that records quotient observables while any optimiser trains."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import observables as obs
from .._reduce import sum_all
from .._tree import float_dtype, widen
from ..observables._charges import masked_leaves
from ..observables._hessian import _hessian_extremes
from ..observables._util import charge_change, charge_linear, charges_dict, check_like, tree_dot, tree_sqnorm
from ._gauge import GaugeFixState, HorizontalState, _like
from ._spec import SGDSpec, accepted_extra_args, check_period, check_wrapped, with_extra_args

#: The per-step observables recorded by default (all cheap: closed-form projections, no extra gradients).
DEFAULT_OBSERVABLES: tuple[str, ...] = (
    "loss",
    "grad_norm",
    "grad_norm_canonical",
    "update_horizontal_norm",
    "update_vertical_norm",
    "charges",
    "charge_drift",
    "charge_drift_predicted",
    "invariant_norms",
    "angular_update",
    "curvature",
    "shock_number",
    "fold_number",
    "effective_lr",
)
_HESSIAN_AT = ("quotient", "horizontal", "raw")
#: Every point ``hessian_at`` may name: the default ones and ``"preconditioned"`` (needs ``preconditioner=``).
_HESSIAN_AT_ALL = _HESSIAN_AT + ("preconditioned",)
#: The batches the directional curvature's gradient at ``theta_{k+1}`` may come from (``curvature_batch``).
_CURVATURE_BATCHES = ("next", "same")
#: Parameters times points up to which the Hessian's Lanczos runs at several points are vmapped, not mapped.
_SIDE_BY_SIDE_MAX = 2**18


class QuotientTrajectoryState(NamedTuple):
    """State of :func:`quotient_trajectory`; its pytree structure is fixed at ``init``.

    Attributes:
        inner_state: the wrapped optimiser's state.
        count: number of updates so far (int32).
        observables: the latest observables ``{key: array or {component: array}}`` (see
            :func:`observables_of`).
        carry: what later steps need: the previous update (for the directional curvature), scalars of the
            previous step, the charge cross terms ``c_k`` of the momentum recursion, and the last continuous
            canonical element (``"canon"``, the warm start of the next one).
        eigenvectors: ``{"top_<where>" / "bottom_<where>": pytree with a leading axis k}`` of the last Hessian
            evaluation when ``keep_eigenvectors=True``, else ``{}``.
    """

    inner_state: Any
    count: jax.Array
    observables: dict
    carry: dict
    eigenvectors: dict


def _zeros_like_struct(struct):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), struct)


def quotient_trajectory(
    tx: optax.GradientTransformation,
    group,
    *,
    observables: Sequence[str] | None = None,
    every: int = 1,
    hessian_every: int | None = None,
    spec: SGDSpec | None = None,
    hessian_at: Sequence[str] = _HESSIAN_AT,
    hessian_k: int = 1,
    lanczos_steps: int = 20,
    lanczos_method: str = "loop",
    keep_eigenvectors: bool = False,
    noise_every: int | None = None,
    seed: int = 0,
    preconditioner: Callable[[Any], Any] | None = None,
    curvature_batch: str = "next",
) -> optax.GradientTransformationExtraArgs:
    """Wrap ``tx`` so that every update also records quotient observables (THEORY sections 1-4).

    Put it outermost: the incoming ``updates`` must be the raw gradients ``g_k``.  The wrapped optimiser runs
    unchanged (its updates are returned as they are); the observables of step ``k`` are computed from
    ``theta_k``, ``g_k`` and the final update ``Delta_k`` and stored in the state
    (:func:`observables_of`).  The state's structure is fixed at ``init`` (``lax.scan`` / ``vmap`` safe).

    Extra arguments of ``update`` (``optax`` extra args; :func:`~quotient_sgd.optim.train` passes them all):

    - ``value``: the loss at ``theta_k`` (the ``loss`` observable; NaN without it);
    - ``loss_fn``: ``params -> loss`` on the step's batch; needed when ``hessian_every`` is set or
      ``curvature_batch="same"``;
    - ``example_loss_fn``: ``params -> (B,)`` per-example losses; needed when ``noise_every`` is set.

    Observables (keys of :func:`observables_of`, kinds in :data:`quotient_sgd.observables.KINDS`):
    ``loss, grad_norm, grad_norm_canonical, update_horizontal_norm, update_vertical_norm, charges,
    charge_drift, charge_drift_predicted, invariant_norms, angular_update, curvature, shock_number,
    fold_number, effective_lr``.  Notes: ``charges`` / ``charge_drift`` / ``charge_drift_predicted`` /
    ``invariant_norms`` / ``angular_update`` / ``effective_lr`` are dicts keyed by component name
    (``effective_lr`` also has ``"global"``); ``curvature``, ``shock_number`` and ``fold_number`` recorded at
    step ``k`` describe the previous step ``k - 1`` (they need ``g_k``; zero at the first step); the shock /
    fold numbers use the spec's learning rate (times the scale of a :func:`~quotient_sgd.diagnostics.shock_aware_lr`
    around the optimiser, :class:`SGDSpec`), else the step's own rate ``-<g_k, Delta_k> / |g_k|^2`` at the point
    the step is taken from (``eta`` exactly for SGD; for another optimiser the rate of the plain gradient step
    with the same first-order loss decrease), in the frame in which ``kappa`` is measured.  Not
    ``effective_lr["global"]``, whose ``|g_c|^2`` is the canonical gradient's: with it an unbalanced network's
    numbers were multiplied by ``|g|^2 / |g_c|^2`` a second time (a fold number of 9.56 for ``eta kappa = 0.34``).
    ``charge_drift`` is ``Q(theta_{k+1}) - Q(theta_k)`` with ``theta_{k+1} = optax.apply_updates(theta_k,
    Delta_k)`` as the parameters store it: for bfloat16 / float16 parameters it includes the rounding of the step
    to their dtype (which the float32 observables would otherwise not see), so the recorded ``charges`` of
    consecutive steps differ by it, up to their own rounding (``eps Q``: the drift is computed from the stored step,
    ``<grad Q(theta_k), delta> + Q(delta)``, without the cancellation of that difference, which in float32 buried an
    SGD step's ``eta^2 Q(g)`` at small learning rates).  ``charge_drift_predicted`` is the exact SGD identity
    (:func:`quotient_sgd.observables.predict_charge_drift`) and needs ``spec``; without one (Adam, other
    optimisers), and when ``tx`` contains :func:`~quotient_sgd.optim.gauge_fix` (its jumps to the canonical
    representative move the charges by what the identity does not contain) or a :func:`~quotient_sgd.optim.
    horizontal` inside a chain, it is NaN: the drift is observed, not predicted; so it is from the first step whose
    update or momentum increment is not the one the spec describes, as the optimiser's own momentum (one
    ``optax.trace`` state) shows, e.g. a global-norm clip after the momentum acting, ``optax.centralize`` before it,
    or, with a spec of momentum 0, whose ``Delta + eta lambda w`` moves the charges to first order (an optimiser with
    momentum, a per-coordinate scaling) (:class:`SGDSpec`; several traces are refused with a spec).  When ``tx`` is
    itself ``horizontal(...)`` the update is orthogonal to the orbit, and the drift is ``Q(Delta)`` exactly, for any
    optimiser inside (Adam included) and with or without ``spec`` (float32: up to the projection's rounding,
    ``<grad Q(theta), Delta>`` is not exactly zero).  When ``tx`` is itself ``gauge_fix(...)``, its update
    ``c(theta) + Delta - theta`` also holds the re-gauging jump to the canonical representative (a reordering of
    units, a rescale: a change of coordinates, as large as the step or larger); the observables of the step
    (``update_horizontal_norm``, ``update_vertical_norm``, ``angular_update``, ``effective_lr``, ``curvature``,
    ``shock_number``, ``fold_number``) describe the step ``Delta`` taken from ``c(theta)`` with the gradient
    transported there, while ``charges`` / ``charge_drift`` are of the parameters as stored; the Hessian and
    noise observables below are evaluated at ``c(theta)`` too (every ``where`` of ``hessian_at``: there the
    current point is the canonical one).

    With ``hessian_every=K``, every ``K`` steps (starting at step 0): for each ``where`` in ``hessian_at``
    (``"quotient"``: horizontal Hessian at the canonical representative, orbit invariant; ``"horizontal"``: at
    the current point, what the step sees; ``"raw"``: unprojected), ``sharpness_<where>`` (top eigenvalue),
    ``lambda_min_<where>`` (bottom), ``hessian_top_<where>`` / ``hessian_bottom_<where>`` (``hessian_k`` each;
    NaN past the dimension of the space, e.g. of a small model's horizontal space),
    plus ``shock_number_hessian = eta max(0, -lambda_min_horizontal)``, ``fold_number_hessian =
    eta max(0, lambda_max_horizontal)`` and ``hessian_step``; values persist between evaluations.  ``"preconditioned"``
    (not a default; needs ``preconditioner``): the extremes of ``P^-1 H``, the raw Hessian ``H`` at the current
    point preconditioned by the diagonal ``P = preconditioner(inner_state)``, with ``inner_state`` the wrapped
    optimiser's state *after* step ``k`` (for Adam, :func:`~quotient_sgd.optim.adam_preconditioner`: the ``P``
    that step ``k`` divided by), as ``sharpness_preconditioned`` / ``lambda_min_preconditioned`` /
    ``hessian_top_preconditioned`` / ``hessian_bottom_preconditioned`` (raw kind;
    :func:`quotient_sgd.observables.sharpness_preconditioned`).  Adam's step from ``theta_k`` is stable on the
    local quadratic iff ``eta sharpness_preconditioned < 2 (1 + b1) / (1 - b1)``
    (:func:`quotient_sgd.diagnostics.adam_edge`; Cohen et al. 2022).  Its Lanczos runs on its own, after the
    other points' (another operator).  ``lanczos_steps``
    Lanczos iterations each, by ``lanczos_method`` (:func:`quotient_sgd.observables.lanczos_extremes`; the
    default ``"loop"`` compiles the Hessian-vector product once; the evaluations at several points are one
    ``lax.map``, so the product and the projection are compiled once for all of them; vmapped for models of up to
    ~87k parameters, where a product costs its kernel launches more than its arithmetic).  With ``noise_every=K``:
    ``noise_sigma2``, ``temperature``, ``viscosity`` (:func:`quotient_sgd.observables.gradient_noise`; NaN for a batch
    of one example, which has no sample variance).  Their ``eta`` is the spec's learning rate, else the
    evaluation step's own rate ``-<g_k, Delta_k> / |g_k|^2`` (as for the shock / fold numbers; computed there
    whatever ``every`` is).

    Cost: ``grad_norm_canonical``, ``effective_lr`` (its ``"global"`` entry), ``invariant_norms`` and the update
    split call ``group.canonical_element`` / ``group.invariants`` / ``group.vertical``; for groups whose
    components overlap (rescale chains, permutations) these are solves that can cost far more than a training
    step (see ``benchmarks/trajectory.py``).  The other defaults are closed-form passes over the parameters.
    Pick ``observables=`` and ``every=`` accordingly.

    Args:
        tx: any optax transformation (extra-args aware or not).
        group: the model's symmetry group (:mod:`quotient_sgd.symmetry`).
        observables: the per-step keys to record (default :data:`DEFAULT_OBSERVABLES`).
        every: refresh the per-step observables every ``every`` steps (the charge cross term and the
            previous-step buffer are updated every step regardless, so the identities stay exact).
        spec: :class:`SGDSpec` describing ``tx`` for the charge-drift prediction; ``init`` refuses it when
            ``tx``'s state shows it is not SGD (Adam, RMSProp, ...), unless ``tx`` is or contains
            ``horizontal(...)`` / ``gauge_fix(...)``, a schedule in it when ``tx`` can skip steps
            (``optax.MultiSteps``, ``apply_if_finite``), momentum or a weight decay beside ``optax.apply_every``
            (``ValueError``), and a hyperparameter name that no
            ``optax.inject_hyperparams`` in ``tx`` holds (``KeyError`` naming the field, the name and the injected
            names).
        seed: seeds the Lanczos starting vectors (folded with the step count).
        preconditioner: ``inner_state -> diag(P)`` (a pytree like the parameters, positive), pure and traceable;
            read only with ``"preconditioned"`` in ``hessian_at``, which needs it.
        curvature_batch: the batch of the gradient ``g_{k+1}`` at ``theta_{k+1}`` in the directional curvature
            ``kappa_k`` (and so in ``shock_number`` / ``fold_number``).  ``"next"`` (default): the next step's
            gradient, on the next batch; on mini-batches ``kappa_k`` then holds the difference of two batches'
            gradients, and for plain SGD ``eta kappa_k = 1 - <g_{k+1}, g_k> / |g_k|^2`` sits near 1 wherever the
            batch noise dominates, whatever the Hessian.  ``"same"``: ``grad L_B(theta_{k+1})`` on step ``k``'s own
            batch ``B`` (one extra gradient of the extra argument ``loss_fn``, only at the steps whose curvature is
            recorded, i.e. those before a step with ``count % every == 0``): ``kappa_k`` is then the exact secant
            curvature ``<g_B(theta_{k+1}) - g_B(theta_k), Delta_k> / |Delta_k|^2`` of the step's batch loss along
            the step (the Rayleigh quotient of the batch Hessian averaged over the step), free of batch noise.  In
            both it is recorded at step ``k + 1``; for full-batch training the two agree up to rounding.

    Example::

        tx = quotient_trajectory(optax.sgd(0.1), group, spec=SGDSpec(0.1))
        params, state, traj = train(loss_fn, params, tx, data)
        traj["grad_norm_canonical"]          # one value per step
    """
    if isinstance(observables, str) or isinstance(hessian_at, str):
        which, value = ("observables", observables) if isinstance(observables, str) else ("hessian_at", hessian_at)
        raise ValueError(f"{which} must be a sequence of names, e.g. ({value!r},), not the string {value!r}")
    try:
        keys = tuple(DEFAULT_OBSERVABLES if observables is None else observables)
    except TypeError:  # (a number failed with a bare "'int' object is not iterable")
        raise ValueError(f"quotient_trajectory: observables must be a sequence of names from {DEFAULT_OBSERVABLES}, "
                         f"e.g. ('loss',), or None (all of them), got {observables!r}") from None
    unknown = [k for k in keys if k not in DEFAULT_OBSERVABLES]
    if unknown:
        raise ValueError(_unknown_observables(unknown))
    if lanczos_method not in ("loop", "unrolled", "matfree"):
        raise ValueError(f"lanczos_method must be 'loop', 'unrolled' or 'matfree', got {lanczos_method!r}")
    if not isinstance(hessian_at, (tuple, list)) or not all(isinstance(w, str) for w in hessian_at):
        # (None, a set, a nested list failed in set() with a bare "unhashable type" / "not iterable" TypeError)
        raise ValueError(f"hessian_at must be a sequence of names from {_HESSIAN_AT_ALL}, e.g. ('horizontal',), "
                         f"got {hessian_at!r}")
    bad_at = set(hessian_at) - set(_HESSIAN_AT_ALL)
    if bad_at:
        raise ValueError(f"hessian_at: unknown {sorted(bad_at)}; choose from {_HESSIAN_AT_ALL}")
    if len(set(hessian_at)) != len(tuple(hessian_at)):  # each would run its own Lanczos into the same keys
        raise ValueError(f"hessian_at: names a point more than once: {tuple(hessian_at)}")
    every = check_period("quotient_trajectory", "every", every)
    hessian_every = check_period("quotient_trajectory", "hessian_every", hessian_every, optional=True)
    noise_every = check_period("quotient_trajectory", "noise_every", noise_every, optional=True)
    if spec is not None and not isinstance(spec, SGDSpec):
        raise TypeError(f"quotient_trajectory: spec must be None or a quotient_sgd.optim.SGDSpec (e.g. "
                        f"SGDSpec(0.1, momentum=0.9)), got {spec!r}")
    # checked whether or not hessian_every is set: an invalid value was accepted silently without it, and then
    # refused, or (keep_eigenvectors="no", truthy) taken at its truth value, once hessian_every was added
    hessian_k = check_period("quotient_trajectory", "hessian_k", hessian_k)
    lanczos_steps = check_period("quotient_trajectory", "lanczos_steps", lanczos_steps)
    if not isinstance(keep_eigenvectors, (bool, np.bool_)):
        raise TypeError(f"quotient_trajectory: keep_eigenvectors must be True or False, got {keep_eigenvectors!r}")
    if hessian_every is not None:
        if not hessian_at:
            raise ValueError(f"hessian_at must name at least one of {_HESSIAN_AT_ALL} when hessian_every is set")
        if "preconditioned" in hessian_at and preconditioner is None:
            raise ValueError("quotient_trajectory: hessian_at names 'preconditioned', which needs preconditioner= "
                             "(a function inner_state -> diag(P) like the parameters; for Adam / AdamW "
                             "quotient_sgd.optim.adam_preconditioner(b1, b2, eps))")
        if not 1 <= hessian_k <= lanczos_steps:
            raise ValueError(f"need 1 <= hessian_k <= lanczos_steps, got hessian_k={hessian_k}, "
                             f"lanczos_steps={lanczos_steps}")
    if preconditioner is not None and not callable(preconditioner):
        raise TypeError(f"quotient_trajectory: preconditioner must be None or a function inner_state -> diag(P), "
                        f"got {preconditioner!r}")
    if preconditioner is not None and (hessian_every is None or "preconditioned" not in hessian_at):
        raise ValueError("quotient_trajectory: preconditioner= is read only with hessian_every set and "
                         f"'preconditioned' in hessian_at (got hessian_every={hessian_every!r}, "
                         f"hessian_at={tuple(hessian_at)!r}); add them, or drop preconditioner")
    if not isinstance(curvature_batch, str) or curvature_batch not in _CURVATURE_BATCHES:
        raise ValueError(f"quotient_trajectory: curvature_batch must be one of {_CURVATURE_BATCHES} (the batch of the "
                         f"gradient at theta_(k+1) in the directional curvature), got {curvature_batch!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"quotient_trajectory: seed must be an integer (it seeds the Lanczos starting vectors), got "
                        f"{seed!r}")
    if not -2**63 <= seed < 2**63:  # jax.random.key raised a bare "Python int too large to convert to C long"
        raise ValueError(f"quotient_trajectory: seed={seed!r} is not allowed; need an integer in [-2**63, 2**63) (it "
                         f"seeds the Lanczos starting vectors)")
    check_wrapped("quotient_trajectory", tx, group)
    inner = with_extra_args(tx)
    want = set(keys)
    need_curv = bool(want & {"curvature", "shock_number", "fold_number"})
    # curvature_batch="same": the secant's numerator <g_B(theta_{k+1}) - g_k, Delta_k> on step k's batch is carried
    # (one extra gradient of loss_fn); "next": the step Delta_k and <g_k, Delta_k>, completed by the next gradient
    same_batch = need_curv and curvature_batch == "same"
    # the shock / fold numbers need the step's learning rate (without a spec: the step's own, _step_rate)
    need_lr = bool(want & {"shock_number", "fold_number"})
    need_cross = "charge_drift_predicted" in want and spec is not None
    need_canon = bool(want & {"grad_norm_canonical", "effective_lr", "invariant_norms"})
    base_key = jax.random.key(seed)
    explained = _explain_canonical(_canonical_users(keys, hessian_every, hessian_at))

    # -- the per-step observables ---------------------------------------------------------------------------
    def step_observables(params, grads, updates, value, lr_spec, carry, next_params, frame=None):
        """``next_params``: ``theta_{k+1}`` as the parameters will hold it (``optax.apply_updates`` in their own
        dtype, then widened), which the observed charge drift is measured at.  ``frame``: ``(point, gradient,
        step)`` of the step taken, which the update norms, angular update, effective learning rates and the
        curvature's carried step describe (under :func:`gauge_fix`: :func:`_section_step`); default
        ``(params, grads, updates)``."""
        sp, sg, su = (params, grads, updates) if frame is None else frame
        out: dict[str, Any] = {}
        dt = float_dtype(params)
        if "loss" in want:
            out["loss"] = jnp.asarray(jnp.nan if value is None else value, dt)
        if "grad_norm" in want:
            out["grad_norm"] = obs.grad_norm(grads)
        gc = elem = None
        if need_canon:
            # the continuous canonical point (norms there equal those at the canonical representative: the
            # two differ by a permutation of units), warm-started from the previous step's element
            elem = group.continuous_canonical_element(params, init=carry.get("canon"))
        if want & {"grad_norm_canonical", "effective_lr"}:
            gc = obs.canonical_gradient(group, params, grads, elem)
            if "grad_norm_canonical" in want:
                out["grad_norm_canonical"] = jnp.sqrt(tree_sqnorm(gc))
        if want & {"update_horizontal_norm", "update_vertical_norm"}:
            h, v = obs.update_split_norms(group, sp, su)
            if "update_horizontal_norm" in want:
                out["update_horizontal_norm"] = h
            if "update_vertical_norm" in want:
                out["update_vertical_norm"] = v
        q = charges_dict(group, params)
        if "charges" in want:
            out["charges"] = q
        if "charge_drift" in want:
            # at theta_{k+1} as stored: for bfloat16 / float16 parameters the rounding of the step to their dtype
            # moves the charges too (often by more than the step itself), and is part of the observed drift; from
            # the stored step next_params - params (exact), not as a difference of the charges, which cancelled (a
            # float32 drift below eps Q came out as rounding)
            out["charge_drift"] = charge_change(group, params, next_params)
        if "invariant_norms" in want:
            out["invariant_norms"] = obs.invariant_norms(group, params, elem)
        if "angular_update" in want:
            out["angular_update"] = obs.angular_update(group, sp, su)
        eff = None
        if "effective_lr" in want:
            eff = obs.effective_lr(group, sp, sg, su, gc)
            if "effective_lr" in want:
                out["effective_lr"] = eff
        if need_curv:
            # kappa_{k-1} = (<g_k, Delta_{k-1}> - <g_{k-1}, Delta_{k-1}>) / |Delta_{k-1}|^2
            # (obs.directional_curvature with the previous step's scalars carried instead of g_{k-1})
            dd = carry["prev_dd"]
            ok = dd != 0  # (0 for a zero step; NaN after a non-finite one, as obs.directional_curvature)
            # curvature_batch="same": the numerator was completed at the previous step, on its own batch
            num = carry["prev_num"] if same_batch else tree_dot(grads, carry["prev_update"]) - carry["prev_gd"]
            kappa = jnp.where(ok, num / jnp.where(ok, dd, jnp.ones_like(dd)), jnp.zeros_like(dd))
            if "curvature" in want:
                out["curvature"] = kappa
            if "shock_number" in want:
                out["shock_number"] = obs.shock_number(carry["prev_lr"], kappa)
            if "fold_number" in want:
                out["fold_number"] = obs.fold_number(carry["prev_lr"], kappa)
        return out, q, eff, elem

    def _curv_terms(grads, updates):
        return tree_dot(grads, updates), tree_sqnorm(updates)

    # -- init ---------------------------------------------------------------------------------------------------
    @explained
    def init(params):
        inner_state = inner.init(params)
        if spec is not None:
            # a name that no inject_hyperparams holds (SGDSpec("lr") for learning_rate) raised at the first update
            spec.resolve(inner_state, jnp.zeros((), jnp.int32))
        if spec is not None and not _contains(inner_state, GaugeFixState, HorizontalState):
            # (horizontal(...) predicts Q(Delta) without the spec; gauge_fix / an inner horizontal: not predicted)
            _check_sgd_like(inner_state)
            _check_momentum_dtype(spec, inner_state, params)
            _check_one_momentum(inner_state, params)
            _check_schedule_counts(spec, inner_state)
            _check_apply_every(spec, inner_state)
            _check_shock_aware_covers(inner_state, params)
        size = sum(jnp.size(x) for x in jax.tree.leaves(params))
        if hessian_every is not None and lanczos_method == "matfree" and lanczos_steps > size:
            # matfree's tridiagonalisation refuses it at the first evaluation, naming its own num_matvecs
            raise ValueError(f"quotient_trajectory: lanczos_steps={lanczos_steps} exceeds the {size} parameters, "
                             f"the most that lanczos_method='matfree' allows (it does not detect an exhausted Krylov "
                             f"space); lower lanczos_steps, or use lanczos_method='loop' (the default), which does")
        params = widen(params)  # observables of bfloat16 / float16 parameters are computed in float32
        dt = float_dtype(params)
        zero = jnp.zeros((), dt)

        def shape_fn(p):
            hp = None if spec is None else {"learning_rate": jnp.ones((), dt)}
            carry0 = _carry0(p)
            o, _, _, _ = step_observables(p, p, p, zero, hp, carry0, p)
            return o

        # NaN until the first update records them: zeros read as values (charges 0, grad_norm 0) that the
        # parameters do not have
        observ = jax.tree.map(lambda x: jnp.full(x.shape, jnp.nan if jnp.issubdtype(x.dtype, jnp.inexact) else 0,
                                                 x.dtype), jax.eval_shape(shape_fn, params))
        if "charge_drift_predicted" in want:
            observ["charge_drift_predicted"] = jax.tree.map(
                lambda x: jnp.full(x.shape, jnp.nan, x.dtype), _zeros_like_struct(
                    jax.eval_shape(lambda p: charges_dict(group, p), params)))
        if "loss" in observ:
            observ["loss"] = jnp.full((), jnp.nan, dt)
        if hessian_every is not None:
            for w in hessian_at:
                observ[f"sharpness_{w}"] = jnp.full((), jnp.nan, dt)
                observ[f"lambda_min_{w}"] = jnp.full((), jnp.nan, dt)
                observ[f"hessian_top_{w}"] = jnp.full((hessian_k,), jnp.nan, dt)
                observ[f"hessian_bottom_{w}"] = jnp.full((hessian_k,), jnp.nan, dt)
            if "horizontal" in hessian_at:
                observ["shock_number_hessian"] = jnp.full((), jnp.nan, dt)
                observ["fold_number_hessian"] = jnp.full((), jnp.nan, dt)
            observ["hessian_step"] = jnp.full((), -1, jnp.int32)
        if noise_every is not None:
            for k in ("noise_sigma2", "temperature", "viscosity"):
                observ[k] = jnp.full((), jnp.nan, dt)
        eigvecs = {}
        if hessian_every is not None and keep_eigenvectors:
            for w in hessian_at:
                for end in ("top", "bottom"):
                    eigvecs[f"{end}_{w}"] = jax.tree.map(
                        lambda x: jnp.zeros((hessian_k,) + x.shape, x.dtype), params)
        return QuotientTrajectoryState(inner_state, jnp.zeros((), jnp.int32), observ, _carry0(params), eigvecs)

    def _carry0(params):
        dt = float_dtype(params)
        carry: dict[str, Any] = {}
        if same_batch:
            carry["prev_num"] = jnp.zeros((), dt)
            carry["prev_dd"] = jnp.zeros((), dt)
            carry["prev_lr"] = jnp.zeros((), dt)
        elif need_curv:
            carry["prev_update"] = jax.tree.map(jnp.zeros_like, params)
            carry["prev_gd"] = jnp.zeros((), dt)
            carry["prev_dd"] = jnp.zeros((), dt)
            carry["prev_lr"] = jnp.zeros((), dt)
        if need_cross:
            carry["cross"] = jax.tree.map(
                jnp.zeros_like, _zeros_like_struct(jax.eval_shape(lambda p: charges_dict(group, p), params)))
        if need_canon:
            carry["canon"] = group.continuous_canonical_element(params)
        return carry

    # -- update ---------------------------------------------------------------------------------------------
    @explained
    def update(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("quotient_trajectory needs params: call tx.update(grads, state, params, value=loss)")
        # the raw gradients, leaf for leaf like params: another tree (the gradients of another model, a sub-tree)
        # failed inside the step with JAX's bare "pytree structure error" naming neither argument
        check_like("quotient_trajectory", "params", params, updates=updates)
        grads = updates
        new_updates, inner_state = inner.update(grads, state.inner_state, params,
                                                **accepted_extra_args(inner.update, extra_args))
        returned = new_updates
        next_params = _as_stored(params, returned)
        params, grads, new_updates = widen(params), widen(grads), widen(new_updates)  # as in init
        count = state.count
        dt = float_dtype(params)
        hp = None if spec is None else {k: jnp.asarray(v, dt) for k, v in spec.resolve(inner_state, count).items()}
        if hp is not None:
            # diagnostics.shock_aware_lr around the SGD multiplies its whole update by the scale s it applied at this
            # step: the step taken is that of learning rate eta * s (the momentum, fed by the raw gradients, is not
            # scaled), which the identity, the shock / fold numbers and the temperature then use
            hp["learning_rate"] = hp["learning_rate"] * _applied_scale(inner_state, dt)
        value = extra_args.get("value")
        if "loss" in want:
            _check_value(value)
        carry = state.carry

        observ = dict(state.observables)
        step_keys = [k for k in observ if k in want and k != "charge_drift_predicted"]
        # tx = gauge_fix(...): the step of the fixed dynamics is taken from c(theta) with the transported gradient;
        # the update also holds the jump theta -> c(theta) (a change of coordinates), which the step observables
        # leave out.  Computed every step when the curvature carries the step, else where they are recorded.
        section = isinstance(inner_state, GaugeFixState)
        frame = _section_step(group, params, grads, new_updates, inner_state) if section and need_curv else None

        def step_frame():
            # (point, gradient, step) of the step taken (not cached: also called inside lax.cond branches)
            if frame is not None:
                return frame
            if section:
                return _section_step(group, params, grads, new_updates, inner_state)
            return params, grads, new_updates

        def step_point():
            # where the step is taken from: under gauge_fix the canonical point c(theta), which the Hessian and
            # noise observables describe (at the stored theta they would describe the parameterisation the
            # re-gauging leaves, e.g. a re-gauged initialisation at step 0); the point alone, without the
            # transported gradient and the step that the whole frame also computes
            if frame is not None:
                return frame[0]
            return _section_point(group, params, inner_state) if section else params

        def observe():
            f = step_frame() if want & _STEP_FRAME_OBSERVABLES else (params, grads, new_updates)
            return step_observables(params, grads, new_updates, value, hp, carry, next_params, f)

        if every == 1:
            fresh, q, _, elem = observe()
        else:
            fresh, elem = jax.lax.cond(
                count % every == 0,
                lambda _: tuple(observe()[i] for i in (0, 3)),
                lambda _: ({k: observ[k] for k in step_keys}, carry.get("canon")),
                None,
            )
            q = None
        observ.update(fresh)
        new_carry: dict[str, Any] = {}
        if need_canon:
            new_carry["canon"] = elem

        def step_lr():
            # this step's learning rate: the spec's, else the step's own -<g, Delta> / |g|^2 in the frame of the
            # step taken (_step_rate); computed once per step when the curvature needs it, else inside the branches
            # that use it
            if lr_now is not None:
                return lr_now
            if hp is not None:
                return hp["learning_rate"]
            _, sg, su = step_frame()
            return _step_rate(sg, su)

        def record_prediction(pred):
            if every == 1:
                observ["charge_drift_predicted"] = pred
            else:
                rec = count % every == 0
                observ["charge_drift_predicted"] = jax.tree.map(
                    lambda a, b: jnp.where(rec, a, b), pred, observ["charge_drift_predicted"])

        lr_now = None
        if need_lr and (every == 1 or hp is not None):  # (every > 1 without spec: see prev_lr below)
            lr_now = step_lr()
        if "charge_drift_predicted" in want and isinstance(inner_state, HorizontalState):
            # tx = horizontal(...): Delta is orthogonal to the orbit, and the change of a charge, quadratic or
            # linear, is its linear term <grad Q(theta), Delta> (grad Q(theta) is a vertical tangent: zero) plus
            # Q(Delta): the drift is Q(Delta) exactly, whatever the optimiser inside (up to the projection's
            # rounding)
            pred = charges_dict(group, new_updates)
            if need_cross:
                new_carry["cross"] = carry["cross"]
            record_prediction(pred)
        elif need_cross and _contains(inner_state, GaugeFixState, HorizontalState):
            # gauge_fix's re-gauging jumps to the canonical representative, which moves the charges by an amount
            # the SGD identity does not contain; a horizontal projection inside a chain changes the step the
            # identity models: observed, not predicted (NaN from init)
            new_carry["cross"] = carry["cross"]
        elif need_cross:
            velocity = _momentum_trace(inner_state, params)  # m_{k+1}, the optimiser's own momentum (or None)
            pred, cross = obs.predict_charge_drift(
                group, params, grads, new_updates, carry["cross"],
                lr=hp["learning_rate"], momentum=hp["momentum"], nesterov=spec.nesterov,
                weight_decay=hp["weight_decay"], coupled_weight_decay=hp["coupled_weight_decay"],
                charges_now=q, velocity=widen(velocity) if spec.nesterov else None,
                decay_mask=spec.mask_for(params),
            )
            # A step that changes nothing (an update of exact zeros at a nonzero learning rate) is one the optimiser
            # skipped: optax.apply_if_finite on a non-finite gradient, optax.MultiSteps while it accumulates.  Its
            # momentum is unchanged, so theta^T A m is too and the charges do not move; the recursion would read
            # the zero update as a zero momentum (c -> beta c, a drift of -eta beta c).  At a zero learning rate the
            # momentum does move, and the recursion has it right.
            # (sum |u| == 0 exactly when every entry is 0, NaN included as not 0; a sum by GEMV, where the
            # elementwise test reduced by jnp.all cost 28 us a step on the benchmark MLP)
            skipped = jnp.logical_and(
                hp["learning_rate"] != 0,
                sum(sum_all(jnp.abs(u)).astype(dt) for u in jax.tree.leaves(new_updates)) == 0)
            pred = jax.tree.map(lambda x: jnp.where(skipped, jnp.zeros_like(x), x), pred)
            cross = jax.tree.map(lambda new, old: jnp.where(skipped, old, new), cross, carry["cross"])
            # An update that is not -eta (d + lambda_d w) with d the momentum the optimiser holds (a global-norm
            # clip or another rescaling after optax.trace, a spec whose learning rate, momentum or decays are not
            # the optimiser's), or, at momentum 0, one whose g' = -Delta / eta - lambda w moves the charges to first
            # order (an optimiser with momentum, a per-coordinate scaling): the identity does not describe it, and
            # its cross term is lost for every later step too (NaN, also through beta c_k at beta = 0).  Observed,
            # not predicted: NaN from here on.
            off = None
            if velocity is not None:
                prev_velocity = _momentum_trace(state.inner_state, params)
                off = jnp.logical_or(_off_spec_momentum(returned, velocity, prev_velocity, params, hp, spec),
                                     _off_spec_increment(group, params, velocity, prev_velocity, hp, spec))
            if not _nonzero_number(spec.momentum):
                plain = _off_spec_plain(group, params, returned, hp, spec)
                off = plain if off is None else jnp.logical_or(off, plain)
            if off is not None:
                off = jnp.logical_and(jnp.logical_not(skipped), off)
                pred = jax.tree.map(lambda x: jnp.where(off, jnp.full_like(x, jnp.nan), x), pred)
                cross = jax.tree.map(lambda x: jnp.where(off, jnp.full_like(x, jnp.nan), x), cross)
            new_carry["cross"] = cross
            record_prediction(pred)
        if same_batch:
            _, sg, su = step_frame()
            loss_fn = extra_args.get("loss_fn")
            if loss_fn is None:
                raise ValueError(
                    "quotient_trajectory(curvature_batch='same') needs the extra argument loss_fn=(params -> loss on "
                    "the step's batch): the curvature's gradient at theta_(k+1) is taken on step k's batch; "
                    "quotient_sgd.optim.train passes it, a hand-written loop must too (or use curvature_batch='next')")
            _check_loss_fn(loss_fn, params, "curvature_batch='same'")

            def secant(_):
                # <g_B(theta_{k+1}) - g_B(theta_k), Delta_k> at theta_{k+1} as stored (where the next step's gradient
                # is taken; under gauge_fix c(theta) + Delta as stored), the difference formed before the product
                g1 = _like(widen(jax.grad(loss_fn)(next_params)), sg)
                return jnp.asarray(tree_dot(jax.tree.map(lambda a, b: a - b, g1, sg), su), dt)

            if every == 1:
                new_carry["prev_num"] = secant(None)
            else:  # read only at the next step, recorded when (count + 1) % every == 0
                new_carry["prev_num"] = jax.lax.cond((count + 1) % every == 0, secant,
                                                     lambda _: carry["prev_num"], None)
            new_carry["prev_dd"] = jnp.asarray(tree_sqnorm(su), dt)
        elif need_curv:
            _, sg, su = step_frame()
            gd, dd = _curv_terms(sg, su)
            new_carry["prev_update"] = su
            new_carry["prev_gd"] = gd
            new_carry["prev_dd"] = dd
        if need_curv:
            if lr_now is not None:
                new_carry["prev_lr"] = jnp.asarray(lr_now, dt)
            elif need_lr:
                # every > 1 without spec: this step's learning rate costs a canonicalisation, and only the shock /
                # fold numbers of the next step read it, which are recorded when (count + 1) % every == 0
                new_carry["prev_lr"] = jax.lax.cond((count + 1) % every == 0, lambda _: jnp.asarray(step_lr(), dt),
                                                    lambda _: carry["prev_lr"], None)
            else:
                new_carry["prev_lr"] = carry["prev_lr"]
        eigvecs = state.eigenvectors
        if hessian_every is not None:
            loss_fn = extra_args.get("loss_fn")
            if loss_fn is None:
                raise ValueError(
                    "quotient_trajectory(hessian_every=...) needs the extra argument loss_fn=(params -> loss on "
                    "the step's batch); quotient_sgd.optim.train passes it, a hand-written loop must too."
                )
            _check_loss_fn(loss_fn, params)
            observ, eigvecs = jax.lax.cond(
                count % hessian_every == 0,
                # eta only enters the horizontal shock / fold numbers
                lambda _: _hessian(loss_fn, step_point(), observ, eigvecs, count,
                                   step_lr() if "horizontal" in hessian_at else None, inner_state),
                lambda _: (observ, eigvecs),
                None,
            )
        if noise_every is not None:
            efn = extra_args.get("example_loss_fn")
            if efn is None:
                raise ValueError(
                    "quotient_trajectory(noise_every=...) needs the extra argument example_loss_fn=(params -> (B,) "
                    "per-example losses); pass example_loss_fn to quotient_sgd.optim.train."
                )
            if not callable(efn):
                raise TypeError(f"quotient_trajectory(noise_every=...): the extra argument example_loss_fn must be a "
                                f"function params -> (B,) per-example losses, got {efn!r}")

            def noise(_):
                n = obs.gradient_noise(efn, group, step_point(), lr=step_lr())
                o = dict(observ)
                o.update({k: jnp.asarray(v).astype(observ[k].dtype) for k, v in
                          (("noise_sigma2", n.sigma2), ("temperature", n.temperature), ("viscosity", n.viscosity))})
                return o

            observ = jax.lax.cond(count % noise_every == 0, noise, lambda _: observ, None)
        new_state = QuotientTrajectoryState(inner_state, count + 1, observ, new_carry, eigvecs)
        return returned, new_state

    def _all_extremes(loss_fn, params, key, inner_state):
        """Extremes for every ``where`` in ``hessian_at``, in its order: the same Lanczos (the quotient one at
        ``group.canonicalize(params)``) with keys ``fold_in(key, i)``; several are one ``lax.map`` over the stacked
        points, so the Hessian-vector product, the projection and the Lanczos loop are compiled once.  The
        preconditioned one (another operator) runs on its own."""
        kw = dict(num_matvecs=lanczos_steps, k=hessian_k, method=lanczos_method)
        if "preconditioned" in hessian_at:
            i = list(hessian_at).index("preconditioned")
            pdiag = widen(preconditioner(inner_state))
            pre = obs.sharpness_preconditioned(loss_fn, params, pdiag, key=jax.random.fold_in(key, i), **kw)
            others = [(j, w) for j, w in enumerate(hessian_at) if w != "preconditioned"]
            out = _point_extremes(loss_fn, params, key, [w for _, w in others], [j for j, _ in others])
            out.insert(i, pre)
            return out
        return _point_extremes(loss_fn, params, key, list(hessian_at), list(range(len(hessian_at))))

    def _point_extremes(loss_fn, params, key, where, index):
        """:func:`_all_extremes` for the points ``where`` (of ``hessian_at``, at positions ``index``)."""
        if not where:
            return []
        kw = dict(num_matvecs=lanczos_steps, k=hessian_k, method=lanczos_method)
        keys = [jax.random.fold_in(key, i) for i in index]
        if len(where) == 1:
            w = where[0]
            if w == "quotient":
                return [obs.sharpness_quotient(loss_fn, group, params, key=keys[0], **kw)]
            if w == "horizontal":
                return [obs.sharpness_horizontal(loss_fn, group, params, key=keys[0], **kw)]
            return [obs.sharpness_raw(loss_fn, params, key=keys[0], **kw)]
        canon = group.canonicalize(params) if "quotient" in where else None
        points = [canon if w == "quotient" else params for w in where]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *points)
        projected = jnp.asarray([w != "raw" for w in where])

        def one(args):
            point, proj, k = args
            horizontal = obs.projection_for(group, point, lanczos_method)

            def project(v):  # a real branch: the raw point skips the projection's solves
                return jax.lax.cond(proj, horizontal, lambda u: u, v)

            # the raw point keeps the whole space's breakdown threshold (with the projected points' one, a bulk of
            # eigenvalues below 1e-10 of the top in float64 was taken for a breakdown: bottom eigenvalues 10 times
            # those of the raw Hessian alone, whenever another point was evaluated beside it)
            return _hessian_extremes(loss_fn, point, project, key=k, restricted=proj, **kw)

        # small models: the points' Lanczos runs side by side (vmapped), a third fewer kernel launches per product,
        # which is what a small model's product costs on CPU (measured on the quickstart's 64-32-10 MLP: 3.0 ms ->
        # 2.0 ms per evaluation at three points); large ones one after another (one basis in memory at a time)
        size = sum(x.size for x in jax.tree.leaves(params))
        side_by_side = len(points) if size * len(points) <= _SIDE_BY_SIDE_MAX else 1
        ex = jax.lax.map(one, (stacked, projected, jnp.stack(keys)), batch_size=side_by_side)
        return [jax.tree.map(lambda x, i=i: x[i], ex) for i in range(len(where))]

    def _hessian(loss_fn, params, observ, eigvecs, count, lr, inner_state):
        observ = dict(observ)
        eigvecs = dict(eigvecs)
        dt = float_dtype(params)
        key = jax.random.fold_in(base_key, count)
        exs = _all_extremes(loss_fn, params, key, inner_state)
        for w, ex in zip(hessian_at, exs):
            observ[f"sharpness_{w}"] = ex.top[0].astype(dt)
            observ[f"lambda_min_{w}"] = ex.bottom[0].astype(dt)
            observ[f"hessian_top_{w}"] = ex.top.astype(dt)
            observ[f"hessian_bottom_{w}"] = ex.bottom.astype(dt)
            if w == "horizontal":
                lr_ = jnp.asarray(lr, dt)
                observ["shock_number_hessian"] = lr_ * jnp.maximum(-ex.bottom[0], 0).astype(dt)
                observ["fold_number_hessian"] = lr_ * jnp.maximum(ex.top[0], 0).astype(dt)
            if keep_eigenvectors:
                eigvecs[f"top_{w}"] = ex.top_vectors
                eigvecs[f"bottom_{w}"] = ex.bottom_vectors
        observ["hessian_step"] = count.astype(jnp.int32)
        return observ, eigvecs

    # init traces the observables once for their shapes and may run iterative canonicalisations: jitted, so that
    # repeated inits (new runs, resumed chunks) neither retrace nor dispatch op by op
    return optax.GradientTransformationExtraArgs(jax.jit(init), update)


def _step_rate(grads, updates) -> jax.Array:
    """``-<g, Delta> / |g|^2``: the learning rate of the plain gradient step ``-h g`` with the same first-order loss
    decrease as the step ``Delta`` taken with the gradient ``g`` (``eta`` for SGD, up to rounding), in the frame of
    the point the step is taken from, where the directional curvature ``kappa``, the horizontal Hessian and the
    gradient noise are measured: the ``eta`` of THEORY's ``eta kappa`` and ``T = eta sigma^2 / (2 B)`` when no
    :class:`SGDSpec` gives it.  0 for an update of exact zeros or a zero gradient (a step that did not move), NaN
    for a non-finite step or gradient (as :func:`quotient_sgd.observables.effective_lr`)."""
    gg, gd = tree_sqnorm(grads), tree_dot(grads, updates)
    moved = tree_sqnorm(updates) != 0
    flat = gg == 0
    rate = jnp.where(flat, jnp.zeros_like(gd), -gd / jnp.where(flat, jnp.ones_like(gg), gg))
    return jnp.where(moved, rate, jnp.zeros_like(rate))


def _check_value(value) -> None:
    """``ValueError`` unless the extra argument ``value`` is ``None`` or a scalar (``TypeError`` unless a real one,
    not a bool, string or complex number): it is recorded as the ``loss``
    observable, whose shape is fixed at ``init``.  A per-example vector or a ``(loss, aux)`` pair was recorded as
    it came (``loss`` of shape ``(B,)`` or ``(2,)``), changing the state's structure after the first update: inside a
    ``lax.scan`` an unrelated carry-type error, in a Python loop a wrong ``loss`` with nothing to say so."""
    if value is None:
        return
    dtype = getattr(value, "dtype", None)
    if isinstance(value, (bool, np.bool_, str, bytes)) or not (
            isinstance(value, numbers.Real) or isinstance(value, (tuple, list, dict)) or (
                dtype is not None and (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)))):
        # a string failed in JAX's conversion naming nothing ("could not convert string to float"), a Python complex
        # with "float() argument must be ... a real number"; a complex array lost its imaginary part and a bool was
        # recorded as a loss of 1.0, silently
        raise TypeError(f"quotient_trajectory: the extra argument value= must be the scalar loss at params (a real "
                        f"number, recorded as the 'loss' observable), got {value!r}")
    if isinstance(value, (tuple, list, dict)) or jnp.shape(value) != ():
        what = (f"a {type(value).__name__} of {len(value)}" if isinstance(value, (tuple, list, dict))
                else f"shape {jnp.shape(value)}")
        raise ValueError(f"quotient_trajectory: the extra argument value= must be the scalar loss at params (recorded "
                         f"as the 'loss' observable), got {what}; pass the mean loss, and for a loss function with "
                         f"auxiliary outputs its loss alone (value=loss, not value=(loss, aux))")


def _check_loss_fn(loss_fn, params, who: str = "hessian_every=...") -> None:
    """``TypeError`` / ``ValueError`` naming the extra argument ``loss_fn`` unless it is a function ``params ->
    scalar loss`` (its Hessian is what Lanczos reads; a ``(loss, aux)`` pair or per-example losses failed inside the
    Hessian-vector product with JAX's "Gradient only defined for scalar-output functions")."""
    if not callable(loss_fn):
        raise TypeError(f"quotient_trajectory({who}): the extra argument loss_fn must be a function "
                        f"params -> scalar loss on the step's batch, got {loss_fn!r}")
    out = jax.eval_shape(loss_fn, params)
    if not hasattr(out, "shape") or out.shape != ():
        what = f"shape {out.shape}" if hasattr(out, "shape") else f"a {type(out).__name__}"
        raise ValueError(f"quotient_trajectory({who}): the extra argument loss_fn must return the scalar "
                         f"loss on the step's batch, got {what} (a loss function with auxiliary outputs: pass "
                         f"lambda p: loss_fn(p)[0]; per-example losses: their mean)")


def _canonical_users(keys, hessian_every, hessian_at) -> list[str]:
    """What a :func:`quotient_trajectory` so configured evaluates at the canonical representative."""
    users = [k for k in keys if k in ("grad_norm_canonical", "effective_lr", "invariant_norms")]
    if hessian_every is not None and "quotient" in hessian_at:
        users.append("hessian_at 'quotient'")
    return users


def _explain_canonical(users):
    """Decorator: a ``SymmetryError`` from canonicalising (a group with no canonical section at these parameters,
    e.g. a deep linear chain that is not minimal) is re-raised naming what asked for the canonical point."""
    import functools

    from ..symmetry import SymmetryError

    def deco(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except SymmetryError as e:
                if not users or not str(e).startswith("canonicalize:"):
                    raise
                raise SymmetryError(
                    f"quotient_trajectory: the canonical representative of the parameters' orbit, which this group "
                    f"does not have here, is needed by: {'; '.join(users)}.  Leave them out (observables=, "
                    f"hessian_at=).  The group says: {e}") from e
        return wrapped

    return deco


#: Trajectory keys that are not per-step observables: what records them instead.
_PERIODIC_KEYS = {
    **{f"{p}_{w}": "hessian_every=K" for p in ("sharpness", "lambda_min", "hessian_top", "hessian_bottom")
       for w in _HESSIAN_AT_ALL},
    "shock_number_hessian": "hessian_every=K", "fold_number_hessian": "hessian_every=K",
    "hessian_step": "hessian_every=K",
    "noise_sigma2": "noise_every=K", "temperature": "noise_every=K", "viscosity": "noise_every=K",
}


def _unknown_observables(unknown) -> str:
    """The error for names in ``observables=`` that are not per-step observables: the Hessian and noise keys
    are recorded by their own arguments, misspelt names get the nearest valid ones."""
    import difflib

    lines = [f"quotient_trajectory: unknown observables {list(unknown)}; observables= takes per-step observables, "
             f"choose from {DEFAULT_OBSERVABLES}"]
    for k in unknown:
        if k in _PERIODIC_KEYS:
            lines.append(f"  {k!r} is recorded with {_PERIODIC_KEYS[k]} (not through observables=)")
        elif isinstance(k, str):
            close = difflib.get_close_matches(k, DEFAULT_OBSERVABLES, n=2)
            if close:
                lines.append(f"  {k!r}: did you mean {' or '.join(map(repr, close))}?")
    return "\n".join(lines)


#: States of optax transforms that rescale the step per coordinate or by a searched or learnt step size (adaptive
#: methods, sign methods, line searches, optax.contrib's learning-rate-free and Polyak methods), orthogonalise it
#: (Muon), add noise to it, or mix in gradients of other points (optimistic gradient descent, SAM): the SGD identity
#: of an :class:`SGDSpec` does not hold.  (A trust ratio, LARS, fromage, a Polyak step size, ``optax.polyak_sgd``, and
#: sign descent, ``optax.sign_sgd`` / ``optax.signum``, have empty, trace or EMA states: not recognised.)
_NOT_SGD_STATES = tuple(t for t in (
    *(getattr(optax, n, None) for n in (
        "ScaleByAdamState", "ScaleByAdaDeltaState", "ScaleByAdanState", "ScaleByAmsgradState", "ScaleByBeliefState",
        "ScaleByLionState", "ScaleByNovogradState", "ScaleByRStdDevState", "ScaleByRmsState", "ScaleByRpropState",
        "ScaleByRssState", "ScaleBySM3State", "ScaleByLBFGSState", "ScaleByBacktrackingLinesearchState",
        "ScaleByZoomLinesearchState", "FactoredState", "AddNoiseState")),
    *(getattr(optax.contrib, n, None) for n in (
        "COCOBState", "DAdaptAdamWState", "DifferentiallyPrivateAggregateState", "DoGState", "DoWGState",
        "GaLoreState", "MadgradState", "MechanicState", "MomoAdamState", "MomoState", "MuonState", "ProdigyState",
        "SAMState", "ScaleByAdemamixState", "ScaleBySimplifiedAdEMAMixState", "ScheduleFreeState", "SophiaState")),
    # not exported by optax; its type read abstractly (an init here would start JAX's backend on import, and
    # jax.distributed.initialize must come before that)
    type(jax.eval_shape(optax.scale_by_optimistic_gradient().init, {})),
) if t is not None and t is not optax.EmptyState)


def _state_types(inner_state, types) -> list[str]:
    """The sorted names of the optax states of the given ``types`` found anywhere in ``inner_state``."""
    hit = lambda x: isinstance(x, types)  # noqa: E731
    return sorted({type(x).__name__ for x in jax.tree.leaves(inner_state, is_leaf=hit) if hit(x)})


def _check_sgd_like(inner_state) -> None:
    """``ValueError`` when ``spec`` is given for an optimiser whose state shows that it is not SGD (Adam, RMSProp,
    Adagrad, Lion, LAMB, Adafactor, a line search, noisy SGD, optax.contrib's Prodigy, DoG, Sophia, Muon, SAM ...): the
    predicted drift would be that of an SGD step the optimiser does not take (measured ~100% off for adamw, rmsprop,
    adagrad, adafactor, noisy_sgd, optimistic_gradient_descent, prodigy, sophia, scale_by_muon (its orthogonalised
    step); 240% for sam (gradients at the adversarial point); 55-92% for schedule_free_sgd, mechanize,
    momo; 3% for dog within 6 steps), with nothing to say so."""
    found = _state_types(inner_state, _NOT_SGD_STATES)
    if found:
        raise ValueError(
            f"quotient_trajectory: spec=SGDSpec(...) describes an SGD-family optimiser, but the optimiser's state "
            f"holds {found} (a per-coordinate, searched or learnt rescaling of the step, an orthogonalised step, "
            f"noise, or gradients of other points), for which the SGD charge identity does not hold; pass spec=None "
            f"(charge_drift is observed, charge_drift_predicted NaN), or wrap the optimiser in "
            f"quotient_sgd.optim.horizontal(...), whose drift is predicted for any optimiser")


def _check_momentum_dtype(spec: SGDSpec, inner_state, params) -> None:
    """``ValueError`` when the optimiser keeps a momentum (an ``optax.TraceState``) in a float dtype narrower than the
    parameters' (``optax.sgd(..., accumulator_dtype=jnp.bfloat16)`` for float32 parameters, a float32 accumulator for
    float64 ones).  The SGD charge identity needs ``m_{k+1} = beta m_k + g_k`` in the parameters' precision; optax
    rounds the stored momentum to the accumulator's dtype at every step, and multiplies it by a Python-float
    ``beta`` in that dtype (0.9 is 0.8984375 in bfloat16), so ``theta^T A m`` moves by what the identity does not
    contain, silently (measured on a 3-5-4-3 MLP, 30 steps of heavy ball with decoupled decay: the prediction off the
    observed drift by 15 times the step's drift with a bfloat16 momentum of float32 parameters, and by 8e-5 of it with
    a float32 momentum of float64 parameters, where the identity holds to 1e-8).  A momentum in the parameters' own
    dtype (bfloat16 parameters with the default accumulator) is not refused, nor is one with a spec whose momentum is
    the number 0 (the stored momentum, the gradient alone, is then never read back)."""
    if isinstance(spec.momentum, (numbers.Real, np.ndarray, np.generic)) and float(spec.momentum) == 0:
        return
    floats = [jnp.result_type(x) for x in jax.tree.leaves(params) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    if not floats:
        return
    bits = min(jnp.finfo(d).bits for d in floats)
    for st in _trace_states(inner_state):
        narrow = sorted({jnp.dtype(jnp.result_type(x)).name for x in jax.tree.leaves(st.trace)
                         if jnp.issubdtype(jnp.result_type(x), jnp.floating) and jnp.finfo(jnp.result_type(x)).bits
                         < bits})
        if narrow:
            raise ValueError(
                f"quotient_trajectory: spec=SGDSpec(...) with an optimiser that keeps its momentum in {narrow} "
                f"(accumulator_dtype), narrower than the parameters' {sorted({jnp.dtype(d).name for d in floats})}: "
                f"the rounding of the stored momentum (and of a Python-float momentum to its dtype) at every step "
                f"moves the charges by what the SGD identity does not contain; keep the momentum in the parameters' "
                f"dtype (accumulator_dtype=None), or pass spec=None (charge_drift observed, charge_drift_predicted "
                f"NaN)")


#: States of optax wrappers whose skipped steps leave the wrapped optimiser's state, and so its step count, as it
#: was: a schedule inside then runs on the optimiser's count of applied steps, not on quotient_trajectory's count.
_SKIPPING_STATES = (optax.MultiStepsState, optax.ApplyIfFiniteState, optax.ConditionallyTransformState,
                    optax.ConditionallyMaskState)


def _check_schedule_counts(spec: SGDSpec, inner_state) -> None:
    """``ValueError`` when a field of ``spec`` is a schedule and the wrapped optimiser can skip steps
    (``optax.MultiSteps``, ``optax.apply_if_finite``, ``optax.conditionally_transform`` / ``conditionally_mask``):
    the spec's schedule is evaluated at the wrapper's count of every step, the optimiser's at its own count of the
    steps it applied, so after the first skipped step the two differ and the predicted drift would be silently
    wrong (by 50% with ``MultiSteps(every_k_schedule=3)`` on a halving schedule).  Injected hyperparameters
    (``optax.inject_hyperparams``, named in the spec) store the value the optimiser used and stay exact."""
    fields = ("learning_rate", "weight_decay", "momentum", "coupled_weight_decay")
    scheduled = [f for f in fields if callable(getattr(spec, f)) and not isinstance(getattr(spec, f), str)]
    if not scheduled:
        return
    skipping = _state_types(inner_state, _SKIPPING_STATES)
    if skipping:
        raise ValueError(
            f"quotient_trajectory: spec has the schedule(s) {scheduled} (functions count -> value, evaluated at "
            f"quotient_trajectory's count of all steps), but the optimiser holds {skipping}, whose skipped steps do "
            f"not advance the wrapped optimiser's own step count, so its schedule and the spec's would disagree "
            f"after the first skipped step.  Inject the schedule instead and name it in the spec: "
            f"optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, ...) with SGDSpec('learning_rate', ...) "
            f"(the state then stores the value each step used), or pass spec=None (drift observed, not predicted)")


def _check_apply_every(spec: SGDSpec, inner_state) -> None:
    """``ValueError`` when ``spec`` has momentum or a weight decay (any value but the number 0: an injected or
    scheduled one may be nonzero) and the optimiser holds an ``optax.apply_every``, whose steps are sums of what the
    transforms before it produced.  Before the momentum (``optax.chain(optax.apply_every(k), optax.sgd(eta,
    momentum=beta))``) the momentum accumulates sums of gradients taken at earlier points, which are not orthogonal
    to the symmetry generators at the current one: the identity does not hold, and the optimiser's momentum agrees
    with its update, so nothing flagged it (measured: the prediction 17% off the observed drift, float64 MLP,
    k = 3).  After the optimiser, the update is a sum of ``k`` steps: ``k`` times the decay the spec holds (64% off,
    silently) or a sum of momentum steps (NaN).  The state does not show the order.  Plain SGD with ``apply_every``
    on either side is exact (the parameters do not move while it accumulates), and so is ``optax.MultiSteps``."""
    if not _state_types(inner_state, (optax.ApplyEvery,)):
        return
    fields = ("momentum", "weight_decay", "coupled_weight_decay")
    nonzero = [f for f in fields if not (isinstance(getattr(spec, f), (numbers.Real, np.ndarray, np.generic))
                                         and float(getattr(spec, f)) == 0)]
    if not nonzero:
        return
    raise ValueError(
        f"quotient_trajectory: spec=SGDSpec(...) with {', '.join(f'{f}={getattr(spec, f)!r}' for f in nonzero)} and "
        f"optax.apply_every in the optimiser: a momentum fed by apply_every's sums of earlier gradients, or a sum of "
        f"k decayed (or momentum) steps, does not follow the SGD charge identity of the spec, and the optimiser's "
        f"state does not show the order; pass spec=None (charge_drift observed, charge_drift_predicted NaN), or "
        f"accumulate with optax.MultiSteps (predicted exactly), or use apply_every with plain SGD (predicted exactly)")


def _shock_aware_states(inner_state) -> list:
    """The :class:`quotient_sgd.diagnostics.ShockAwareState` s anywhere in ``inner_state``."""
    from ..diagnostics._shock_lr import ShockAwareState

    hit = lambda x: isinstance(x, ShockAwareState)  # noqa: E731
    return [x for x in jax.tree.leaves(inner_state, is_leaf=hit) if hit(x)]


def _applied_scale(inner_state, dtype) -> jax.Array:
    """The product of the scales that the :func:`~quotient_sgd.diagnostics.shock_aware_lr` transforms in
    ``inner_state`` applied to the update at the step just taken (1 without them)."""
    out = jnp.ones((), dtype)
    for st in _shock_aware_states(inner_state):
        out = out * jnp.asarray(st.scale).astype(dtype)
    return out


def _check_shock_aware_covers(inner_state, params) -> None:
    """``ValueError`` when a :func:`~quotient_sgd.diagnostics.shock_aware_lr` in the optimiser scales the update of
    only some parameters (inside ``optax.masked`` / ``optax.multi_transform``): its scale is then no learning rate
    of the whole step, which an :class:`SGDSpec` describes."""
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    want = jax.tree.structure(params)
    for st in _shock_aware_states(inner_state):
        if jax.tree.structure(st.prev_grads) != want or any(
                masked(x) for x in jax.tree.leaves(st.prev_grads, is_leaf=masked)):
            raise ValueError(
                "quotient_trajectory: spec=SGDSpec(...) with a diagnostics.shock_aware_lr that scales the updates "
                "of only some parameters (inside optax.masked / optax.multi_transform): its scale is not a learning "
                "rate of the whole step, so the charge identity does not describe it; put shock_aware_lr around the "
                "whole optimiser, or pass spec=None (charge_drift observed, charge_drift_predicted NaN)")


def _momentum_trace(inner_state, params):
    """The momentum ``m_{k+1}`` of the wrapped optimiser (the ``trace`` of its one ``optax.TraceState`` shaped like
    ``params``), else ``None``.  Nesterov's update mixes the accumulated gradient into the step, so the charge
    prediction needs the momentum itself when the accumulated gradient is not the raw one (clipping)."""
    found = [x.trace for x in _trace_states(inner_state)]
    if len(found) == 1 and jax.tree.structure(found[0]) == jax.tree.structure(params):
        return found[0]
    return None


def _trace_states(inner_state) -> list:
    """The ``optax.TraceState`` nodes (momenta) of an optimiser state, in tree order."""
    is_trace = lambda x: isinstance(x, optax.TraceState)  # noqa: E731
    return [x for x in jax.tree.leaves(inner_state, is_leaf=is_trace) if is_trace(x)]


def _sqrt_eps(*trees) -> float:
    """The square root of the machine epsilon of the narrowest float dtype among the leaves of ``trees`` (0 when
    none is a float): the tolerance of the per-step checks of an update against its spec."""
    floats = [jnp.result_type(x) for x in jax.tree.leaves(trees) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    return max(float(np.sqrt(jnp.finfo(d).eps)) for d in floats) if floats else 0.0


def _check_one_momentum(inner_state, params) -> None:
    """``ValueError`` when the optimiser holds more than one momentum (``optax.TraceState``) shaped like the
    parameters: an :class:`SGDSpec` describes one, and with several the update is a momentum of momenta (``optax.chain(
    optax.trace(0.9), optax.trace(0.5), optax.scale(-eta))``), which no spec describes and which the per-step check of
    the update against the optimiser's momentum cannot read (it does not know which trace is the spec's): the
    prediction of ``SGDSpec(eta, momentum=0.9)`` came out 23% off the observed drift there (float64 MLP, 20 steps),
    silently.  Traces over some of the parameters only (inside ``optax.masked`` / ``multi_transform``) are not
    counted."""
    want = jax.tree.structure(params)
    found = [x for x in _trace_states(inner_state) if jax.tree.structure(x.trace) == want]
    if len(found) > 1:
        raise ValueError(
            f"quotient_trajectory: spec=SGDSpec(...) with an optimiser that holds {len(found)} momentum traces "
            f"(optax.trace states) shaped like the parameters: one spec describes one SGD momentum, and a momentum of "
            f"momenta moves the charges by what its identity does not contain; pass spec=None (charge_drift observed, "
            f"charge_drift_predicted NaN)")


def _off_spec_increment(group, params, velocity, prev_velocity, hp, spec: SGDSpec) -> jax.Array:
    """Whether the optimiser's momentum took in, at this step, an increment that the charge identity does not
    describe.  The identity needs ``m_{k+1} = beta m_k + g' + lambda_c w`` with ``g'`` any vector whose charge
    linear term at ``theta_k`` vanishes (``<grad Q(theta_k), g'> = 0`` for every charge): the gradient, a global-norm
    clip of it, ``optax.MultiSteps``' mean of gradients taken at ``theta_k``.  A transform before the momentum that
    changes the gradient otherwise (``optax.centralize``, a per-leaf or per-coordinate scaling, added noise) feeds
    it a ``g'`` with a nonzero term, which the update alone does not show: ``optax.chain(optax.centralize(),
    optax.trace(0.9), optax.scale(-eta))`` with ``SGDSpec(eta, momentum=0.9)`` was predicted 197% off the observed
    drift (float64 MLP, 20 steps), silently.  So is a heavy-ball spec whose momentum or coupled decay is not the
    optimiser's (``g'`` then holds ``(beta - beta') m_k`` or ``(lambda_c - lambda_c') w``).  The linear term is the
    charges' Jacobian-vector product at ``theta_k`` along ``g' = m_{k+1} - beta m_k - lambda_c w`` (no extra
    gradient), compared with ``2 |theta| s`` (quadratic charges, Cauchy-Schwarz) or ``sqrt(n) s`` (linear ones, ``n``
    parameters), ``s = |m_{k+1}| + beta |m_k| + lambda_c |w|`` the size of the terms, to the square root of the
    machine epsilon of the narrowest of the momentum's and the parameters' dtypes.  Not checked at
    ``momentum == 0`` (the momentum then holds the step's gradient with a decay the spec may name coupled or
    decoupled; :func:`_off_spec_plain` checks the step there)."""
    if prev_velocity is None:
        return jnp.zeros((), jnp.bool_)
    dt = float_dtype(params)
    beta, lam_c = (jnp.asarray(hp[k], dt) for k in ("momentum", "coupled_weight_decay"))
    tol = _sqrt_eps(velocity, prev_velocity, params)
    mask = spec.mask_for(params)
    w = params if mask is None else masked_leaves(mask, params)
    m1, m0 = widen(velocity), widen(prev_velocity)

    def leaf(x, ref):
        return jnp.asarray(x).astype(jnp.result_type(ref))

    def norm(t):
        return jnp.sqrt(jnp.asarray(tree_sqnorm(t), dt))

    inc = jax.tree.map(lambda a, b, x: a - leaf(beta, a) * b - leaf(lam_c, x) * x, m1, m0, w)
    size = norm(m1) + beta * norm(m0) + lam_c * norm(w)
    return jnp.logical_and(beta != 0, _moves_charges(group, params, inc, size, tol))


def _moves_charges(group, params, direction, size, tol) -> jax.Array:
    """Whether ``direction`` (a pytree like ``params``, of norm at most ``size``) has a nonzero charge linear term
    ``<grad Q(theta), direction>`` at ``params``: the Jacobian-vector product of the charges, compared with
    ``2 |theta| size`` (quadratic charges, Cauchy-Schwarz) or ``sqrt(n) size`` (linear ones, ``n`` parameters) times
    ``tol``."""
    dt = float_dtype(params)
    direction = jax.tree.map(lambda e, p: jnp.asarray(e).astype(jnp.result_type(p)), direction, params)
    _, lin_term = jax.jvp(lambda p: charges_dict(group, p), (params,), (direction,))
    n = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    theta = jnp.sqrt(jnp.asarray(tree_sqnorm(params), dt))
    linear = charge_linear(group)
    off = jnp.zeros((), jnp.bool_)
    for k, t in lin_term.items():
        # (a Python float: a NumPy float64 scalar made the bound float64 beside float32 parameters under x64, which
        # strict promotion refused with a bare TypePromotionError)
        bound = tol * size * (math.sqrt(n) if linear.get(k, False) else 2 * theta)
        for x in jax.tree.leaves(t):
            off = jnp.logical_or(off, jnp.max(jnp.abs(jnp.asarray(x, dt))) > bound)
    return off


def _off_spec_plain(group, params, updates, hp, spec: SGDSpec) -> jax.Array:
    """Whether the update of a step is not one that a spec without momentum describes exactly.  At ``momentum ==
    0`` the spec's step is ``Delta = -eta (g' + (lambda_c + lambda_d) w)`` (coupled and decoupled decay coincide),
    and its identity holds exactly iff ``g' = -Delta / eta - (lambda_c + lambda_d) w`` leaves the charges unchanged
    to first order: the drift is ``B(theta, Delta) + Q(Delta)`` and the identity's ``Q(Delta) - eta (lambda_c +
    lambda_d) B(theta, w)`` (the difference is ``B(theta, Delta + eta (lambda_c + lambda_d) w)``; linear charges
    likewise).  The gradient, a global-norm clip of it, ``optax.MultiSteps``' or ``optax.apply_every``'s sum of
    gradients taken at ``theta_k``, a learning rate off by a factor without decays (the identity is invariant under
    it) pass; an optimiser with momentum (``optax.sgd(eta, momentum=0.9)`` described by ``SGDSpec(eta)``: ``g'``
    holds ``beta m_k``, predicted up to 95% of a step's drift off, float64 MLP), a per-coordinate or per-leaf
    scaling (sign descent, ``optax.centralize``, ``optax.clip``, Adam), added noise, a decay other than the spec's,
    or a step at all where the spec's learning rate is 0 do not.  Measured in the update's own terms, ``Delta + eta
    (lambda_c + lambda_d) w`` (no division by ``eta``), with one Jacobian-vector product of the charges
    (:func:`_moves_charges`), to the square root of the machine epsilon of the narrowest of the update's and the
    parameters' dtypes; not checked at ``momentum != 0`` (:func:`_off_spec_momentum`, :func:`_off_spec_increment`
    read the optimiser's momentum there)."""
    dt = float_dtype(params)
    eta, beta, lam_d, lam_c = (jnp.asarray(hp[k], dt) for k in ("learning_rate", "momentum", "weight_decay",
                                                                 "coupled_weight_decay"))
    tol = _sqrt_eps(updates, params)
    mask = spec.mask_for(params)
    w = params if mask is None else masked_leaves(mask, params)
    u = widen(updates)
    lam = lam_c + lam_d

    def norm(t):
        return jnp.sqrt(jnp.asarray(tree_sqnorm(t), dt))

    v = jax.tree.map(lambda uu, ww: uu + jnp.asarray(eta * lam).astype(jnp.result_type(uu)) * ww, u, w)
    size = norm(u) + jnp.abs(eta) * lam * norm(w)
    # at eta = 0 the spec's step is zero, and its identity predicts no drift whatever the update: the invariance
    # under the learning rate above needs eta != 0 (SGDSpec(0.0) for optax.sgd(0.1) predicted 0 for a drift Q(Delta))
    moved_at_zero = jnp.logical_and(eta == 0, norm(u) != 0)
    return jnp.logical_and(beta == 0, jnp.logical_or(moved_at_zero, _moves_charges(group, params, v, size, tol)))


def _nonzero_number(value) -> bool:
    """Whether a spec field is a concrete nonzero number (static): its checks at ``momentum == 0`` can be left out
    of the compiled step."""
    return isinstance(value, (numbers.Real, np.ndarray, np.generic)) and float(value) != 0


def _off_spec_momentum(updates, velocity, prev_velocity, params, hp, spec: SGDSpec) -> jax.Array:
    """Whether the update of a step is not the one ``spec`` describes, given the momentum of the optimiser's own
    ``optax.trace`` before (``prev_velocity``, ``m_k``) and after (``velocity``, ``m_{k+1}``) the step: the spec's
    update is ``-eta (d + lambda_d w)`` with ``d = m_{k+1}`` (heavy ball) or ``(1 + beta) m_{k+1} - beta m_k``
    (Nesterov: ``g' + beta m_{k+1}``, whatever gradient ``g'`` the momentum accumulated) and ``w`` the decayed
    parameters.  ``optax.chain(optax.trace(beta), optax.clip_by_global_norm(c), optax.scale(-eta))`` rescales ``d``
    by the clip's factor, which no spec holds: its identity came out 49% (heavy ball) and 80 times (Nesterov) off the
    observed drift (float64 MLP).  Measured in the update's own terms (no division by ``eta``), to the square root of
    the machine epsilon of the narrowest of the update's and momentum's dtypes, relative to the size of the terms;
    not checked at ``momentum == 0`` (coupled and decoupled decay then coincide, and a spec may name either;
    :func:`_off_spec_plain` checks the step there)."""
    if spec.nesterov and prev_velocity is None:
        return jnp.zeros((), jnp.bool_)
    dt = float_dtype(params)
    eta, beta, lam_d = (jnp.asarray(hp[k], dt) for k in ("learning_rate", "momentum", "weight_decay"))
    tol = _sqrt_eps(updates, velocity, prev_velocity)
    mask = spec.mask_for(params)
    w = params if mask is None else masked_leaves(mask, params)
    m1 = widen(velocity)
    m0 = widen(prev_velocity) if spec.nesterov else None
    u = widen(updates)

    def leaf(x, *ys):
        return jnp.asarray(x).astype(jnp.result_type(*ys))

    def norm(t):
        return jnp.sqrt(jnp.asarray(tree_sqnorm(t), dt))

    if spec.nesterov:
        d = jax.tree.map(lambda a, b: (1 + leaf(beta, a)) * a - leaf(beta, b) * b, m1, m0)
        size = (1 + beta) * norm(m1) + beta * norm(m0)
    else:
        d, size = m1, norm(m1)
    resid = jax.tree.map(lambda uu, dd, ww: uu + leaf(eta, uu) * (dd + leaf(lam_d, ww) * ww), u, d, w)
    scale = norm(u) + jnp.abs(eta) * (size + lam_d * norm(w))
    return jnp.logical_and(beta != 0, norm(resid) > tol * scale)


def _as_stored(params, updates):
    """``theta + Delta`` as ``optax.apply_updates`` stores it (rounded to each parameter's dtype), widened like the
    other observables' inputs.  The rounding of bfloat16 / float16 leaves is made explicit with
    ``lax.reduce_precision``: XLA may drop a cast to a narrower float followed by a cast back (excess precision),
    and did here, so that the observed drift missed the rounding that the stored parameters undergo."""
    def one(p, u):
        if u is None:
            return widen(p)
        p, u = jnp.asarray(p), jnp.asarray(u)
        wide = widen(p).dtype
        x = widen(p) + _rounded(widen(u), u.dtype).astype(wide)
        return _rounded(x, p.dtype).astype(wide)
    return jax.tree.map(one, params, updates, is_leaf=lambda x: x is None)


#: The observables of the step taken, which under :func:`gauge_fix` leave out its re-gauging jump.
_STEP_FRAME_OBSERVABLES = frozenset({"update_horizontal_norm", "update_vertical_norm", "angular_update",
                                     "effective_lr", "curvature", "shock_number", "fold_number"})


def _section_step(group, params, grads, updates, gstate: GaugeFixState):
    """``(c, g_c, Delta)`` of a :func:`gauge_fix` step from ``params``: the canonical point ``c = k . theta`` it
    stepped from (``k``: the element its state records), the gradient transported there and the step taken from
    it, ``theta + update - c``; ``(params, grads, updates)`` at a step that did not re-gauge (``every > 1``)."""

    def fixed(_):
        c = group.act(gstate.element, params)
        gc = obs.canonical_gradient(group, params, grads, element=gstate.element)
        return c, _like(gc, grads), jax.tree.map(lambda p, u, x: (p + u) - x, params, updates, c)

    return jax.lax.cond(gstate.applied, fixed, lambda _: (params, grads, updates), None)


def _section_point(group, params, gstate: GaugeFixState):
    """The point of :func:`_section_step` alone: ``c = k . theta`` where the step re-gauged, else ``theta``."""
    return jax.lax.cond(gstate.applied, lambda p: group.act(gstate.element, p), lambda p: p, params)


def _contains(inner_state, *state_types) -> bool:
    """Whether the wrapped optimiser's state holds one of ``state_types`` anywhere (e.g. :class:`GaugeFixState`:
    it contains :func:`gauge_fix`); static, read off the state's structure."""
    hit = lambda x: isinstance(x, state_types)  # noqa: E731
    return any(hit(x) for x in jax.tree.leaves(inner_state, is_leaf=hit))


def _rounded(x, dtype):
    """``x`` rounded to the precision of the float ``dtype`` when that is narrower than float32, kept in its own
    dtype (``lax.reduce_precision``, which XLA does not elide as it may a pair of casts)."""
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        fi = jnp.finfo(dtype)
        return jax.lax.reduce_precision(x, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)
    return x


def _find(opt_state) -> list[QuotientTrajectoryState]:
    is_q = lambda x: isinstance(x, QuotientTrajectoryState)  # noqa: E731
    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_q) if is_q(x)]


def observables_of(opt_state) -> dict:
    """The latest observables recorded by the (outermost) :func:`quotient_trajectory` in ``opt_state``:
    ``{key: array or {component: array}}`` (kinds in :data:`quotient_sgd.observables.KINDS`).  Before the first
    update (the state of ``init``) every value is NaN (``hessian_step`` -1): nothing has been recorded yet."""
    found = _find(opt_state)
    if not found:
        raise ValueError(
            "observables_of: no QuotientTrajectoryState in this optimiser state; wrap the optimiser with "
            "quotient_sgd.optim.quotient_trajectory(tx, group)"
        )
    return found[0].observables


def eigenvectors_of(opt_state) -> dict:
    """Ritz vectors of the last Hessian evaluation (``quotient_trajectory(..., keep_eigenvectors=True)``):
    ``{"top_<where>" / "bottom_<where>": pytree like params with a leading axis hessian_k}``.  Vectors for
    ``"quotient"`` live at the canonical representative."""
    found = _find(opt_state)
    if not found or not found[0].eigenvectors:
        raise ValueError("eigenvectors_of: use quotient_trajectory(..., hessian_every=K, keep_eigenvectors=True)")
    return found[0].eigenvectors


def flatten_trajectory(trajectory: dict, sep: str = "/") -> dict[str, Any]:
    """``{"charges": {"rescale0": a}} -> {"charges/rescale0": a}``, e.g. for ``numpy.savez``: one array per key.

    Every pytree node is flattened, not only dicts: an ``aux`` that ``loss_fn`` returned as a tuple, list or
    ``NamedTuple`` gives ``"aux/0"``, ``"aux/1"`` (or the field names); ``None`` entries are left out.  Dicts keep
    their order.  ``sep``: a non-empty string (``sep=1`` failed with a bare "'int' object has no attribute 'join'").
    Two entries that flatten to one name (a key ``"a/b"`` beside ``{"a": {"b": ...}}``) are refused naming both
    paths (the first was dropped silently); pass another ``sep``."""
    if not isinstance(sep, str) or not sep:
        raise TypeError(f"flatten_trajectory: sep must be a non-empty string such as '/', got {sep!r}")
    out: dict[str, Any] = {}
    origin: dict[str, tuple] = {}

    def put(name, path, x):
        if name in out:
            raise ValueError(f"flatten_trajectory: the entries at {list(origin[name])} and {list(path)} both flatten "
                             f"to the name {name!r} with sep={sep!r}; pass a separator none of the keys contains")
        out[name], origin[name] = x, path

    def rec(prefix, keys, v):
        if isinstance(v, dict):
            for k, x in v.items():
                rec(f"{prefix}{sep}{k}" if prefix else str(k), keys + (k,), x)
            return
        for path, x in jax.tree_util.tree_flatten_with_path(v, is_leaf=lambda y: isinstance(y, dict))[0]:
            parts = [_key_name(p) for p in path]
            name = sep.join([prefix] * bool(prefix) + parts)
            if isinstance(x, dict):
                rec(name, keys + tuple(parts), x)
            else:
                put(name, keys + tuple(parts), x)

    rec("", (), trajectory)
    return out


def _key_name(entry) -> str:
    """The name of one pytree path entry: a dict key, a sequence index, an attribute or field name."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)

