"""Cheap per-step observables: closed-form projections, no extra gradient evaluations (THEORY sections 1, 2, 4).

Every function is pure and declares its kind (:mod:`._kinds`).  Arguments follow one convention: ``params`` is
the current point ``theta_k``, ``grads`` the gradient ``g_k = grad L(theta_k)`` of the step's batch, ``updates``
the optimiser's final update ``Delta_k`` (so ``theta_{k+1} = theta_k + Delta_k``).  Low-precision (bfloat16 /
float16) arguments are widened to float32 first, as :func:`quotient_sgd.optim.quotient_trajectory` does: sums over
the parameters in their own dtype overflowed (a float16 gradient of norm 266 read as ``inf``: its square exceeds
65504) or cancelled (a curvature from the difference of two bfloat16 inner products).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._tree import widen
from ._kinds import ORBIT_INVARIANT, RAW, REDUCED_DYNAMICS, observable
from ._util import (
    charge_change,
    charges_dict,
    check_group,
    check_hyper,
    check_like,
    components,
    per_component,
    rescale_members,
    scale_members,
    tree_dot,
    tree_norm,
    tree_sqnorm,
    unit_sum,
)


def _safe_div(a, b):
    """``a / b``, and 0 where ``b == 0`` (a zero step, a zero gradient); NaN where ``a`` or ``b`` is NaN.  (The test
    was ``b > 0``, false for a NaN ``b`` too: a diverged step, NaN parameters and gradients, read as a curvature and
    effective learning rates of exactly 0, and so shock / fold numbers of 0, where every other observable was NaN.)"""
    zero = b == 0
    return jnp.where(zero, jnp.zeros_like(a), a / jnp.where(zero, jnp.ones_like(b), b))


@observable(RAW, "grad_norm")
def grad_norm(grads) -> jax.Array:
    """``|g|``, the Euclidean gradient norm at the current point.  Raw: ``grad L(g.theta) = g^{-T} grad L(theta)``
    changes it along the orbit (THEORY section 1)."""
    return tree_norm(widen(grads))


def canonical_gradient(group, params, grads, element=None):
    """The gradient at the canonical representative ``k . theta``, transported from ``grad L(theta)``.

    For an action that is linear (or affine) in the parameters, ``L(h . phi) = L(phi)`` for ``h = k^{-1}``
    gives ``grad L(k . theta) = J_h^T grad L(theta)`` where ``J_h`` is the (constant) Jacobian of
    ``phi -> h . phi``: one vector-Jacobian product of the action, no second pass through the network.
    ``element`` is ``group.canonical_element(params)`` when already known.
    """
    check_group("canonical_gradient", group)
    check_like("canonical_gradient", "params", params, grads=grads)
    k = group.canonical_element(params) if element is None else element
    # J_h^T grads, each component's in closed form (a rescale's factors, a GL block's A^{-T}: Group._cotransport)
    return group._cotransport_tree(k, grads)


@observable(ORBIT_INVARIANT, "grad_norm_canonical")
def grad_norm_canonical(group, params, grads, element=None) -> jax.Array:
    """``|grad L(c(theta))|``, the gradient norm at the canonical representative (THEORY section 4, kind 1).
    See :func:`canonical_gradient`.

    Orbit invariant where the orbit has a canonical representative.  A rescale unit with exactly one zero side
    (zero outgoing weights with nonzero incoming ones, as every unit of the last hidden layer has under a
    zero-initialised output layer, or the reverse), a GL head with a rank-deficient factor (a zero ``W_O``) or a
    rank-deficient deep linear chain has none (:class:`quotient_sgd.symmetry.Rescale`): its canonical element keeps
    a finite factor there, and the value depends on the point of the orbit.  Measured on a 3-5-4-3 ReLU classifier
    with a zero output kernel: 0.32, 0.24 and 0.42 at three points of one orbit (0.24 is the limit as the output
    kernel goes to zero); :func:`sharpness_quotient` likewise 0.70, 0.33 and 1.41."""
    check_group("grad_norm_canonical", group)
    return tree_norm(canonical_gradient(group, widen(params), widen(grads), element))


@observable(REDUCED_DYNAMICS, "update_horizontal_norm", "update_vertical_norm")
def update_split_norms(group, params, updates) -> tuple[jax.Array, jax.Array]:
    """``(|Delta_h|, |Delta_v|)``: norms of the horizontal and vertical (gauge-drift) parts of the update at
    ``theta`` (THEORY section 1).  Nonzero vertical part for weight decay, momentum and Adam."""
    check_group("update_split_norms", group)
    params, updates = widen(params), widen(updates)
    v = group.vertical(params, updates)
    return tree_norm(jax.tree.map(lambda u, w: u - w, updates, v)), tree_norm(v)


@observable(REDUCED_DYNAMICS, "charges")
def charges(group, params) -> dict[str, jax.Array]:
    """Noether charges per component (THEORY section 2): ``{component name: array}``.  Equivariant rather than
    invariant under the charge-preserving elements: a permutation permutes a rescale component's per-unit
    charges, an orthogonal GL element conjugates a matrix charge (their sorted values / spectra are invariant)."""
    check_group("charges", group)
    return charges_dict(group, params)


@observable(REDUCED_DYNAMICS, "charge_drift")
def charge_drift(group, params, updates) -> dict[str, jax.Array]:
    """Observed change of every charge over the step: ``Q(theta + Delta) - Q(theta)``, with ``theta + Delta`` in the
    parameters' dtype (as stored), computed from the step without cancellation (:func:`._util.charge_change`)."""
    check_group("charge_drift", group)
    check_like("charge_drift", "params", params, updates=updates)
    return charge_change(group, params, jax.tree.map(lambda p, u: p + u, params, updates))


@observable(ORBIT_INVARIANT, "invariant_norms")
def invariant_norms(group, params, element=None) -> dict[str, jax.Array]:
    """Per component, the Euclidean norm of the component's orbit-invariant features ``group.invariants``
    (e.g. ``|(|w_in,j| |w_out,j|)_j|`` for a rescale layer, the norm of ``W_Q W_K^T`` for attention).

    Computed from ``group.unordered_invariants`` (the same arrays up to the order of permuted units, so the
    same norms, without sorting); ``element``: ``group.continuous_canonical_element(params)`` when known."""
    check_group("invariant_norms", group)
    inv = per_component(group, group.unordered_invariants(params, element))
    return {k: tree_norm(v) if jax.tree.leaves(v) else jnp.zeros(()) for k, v in inv.items()}


@observable(REDUCED_DYNAMICS, "angular_update")
def angular_update(group, params, updates) -> dict[str, jax.Array]:
    """For every scale-invariant component (weights feeding a normalisation), the RMS over its normalised units
    of the angle between ``w`` and ``w + Delta`` (radians).  THEORY section 2 (spherical motion dynamics, Wan et
    al. 2021): at the equilibrium of SGD with learning rate ``eta`` and weight decay ``lambda`` the RMS over steps
    of this angle is about ``sqrt(2 eta lambda)``; with heavy-ball momentum ``beta`` about
    ``sqrt(2 eta lambda / (1 + beta))`` when the decay goes through the momentum (coupled / L2,
    ``optax.chain(optax.add_decayed_weights(lambda), optax.sgd(eta, momentum=beta))``) and about
    ``sqrt(2 eta lambda (1 - beta) / (1 + beta))`` when it is decoupled (``optax.chain(optax.trace(beta),
    optax.add_decayed_weights(lambda), optax.scale(-eta))``), to first order in ``eta lambda``.  The equilibrium
    holds for the mean square of the angle: the mean angle over steps is smaller when the angle fluctuates."""
    check_group("angular_update", group)
    check_like("angular_update", "params", params, updates=updates)
    params, updates = widen(params), widen(updates)
    out = {}
    for c in components(group):
        ms = scale_members(c)
        if ms is None:
            continue
        ww = unit_sum((params,), ms, jnp.square)
        wd = unit_sum((params, updates), ms, lambda w, d: w * d)
        nw = jnp.sqrt(ww)
        along = _safe_div(wd, nw)  # component of Delta along w
        # the component of Delta across w from its residual Delta - (<w, Delta> / |w|^2) w, summed per unit (not as
        # sqrt(|Delta|^2 - along^2), which cancels: a step mostly along w, a weight decay beside a small gradient,
        # had its angle's error at sqrt(eps) |Delta| / |w|, an angle of 2.7e-5 for an exact 1.1e-6 in float32)
        coef = _safe_div(wd, ww)
        # (in the unit's common dtype, that of coef: a float32 kernel beside a float64 bias failed under strict
        # dtype promotion with a bare TypePromotionError)
        perp = jnp.sqrt(sum(
            unit_sum((params, updates), ((path, axis),),
                     lambda w, d, axis=axis: jnp.square(d.astype(coef.dtype)
                                                        - _along_axis(coef, axis, w.ndim) * w.astype(coef.dtype)))
            for path, axis in ms))
        ang = jnp.arctan2(perp, nw + along)
        out[c.name] = jnp.sqrt(jnp.mean(jnp.square(ang)))
    return out


def _along_axis(per_unit, axis, ndim):
    """``per_unit`` (one value per unit, shape ``(n,)``; ``(1,)`` for a whole block, ``axis=None``) shaped to
    broadcast against a leaf of ``ndim`` axes whose units lie along ``axis``."""
    if axis is None:
        return per_unit[0]
    shape = [1] * ndim
    shape[axis % ndim] = per_unit.shape[0]
    return jnp.reshape(per_unit, shape)


@observable(REDUCED_DYNAMICS, "curvature")
def directional_curvature(grad_prev, grad_next, step) -> jax.Array:
    """``kappa_k = <g_{k+1} - g_k, theta_{k+1} - theta_k> / |theta_{k+1} - theta_k|^2`` (THEORY section 4):
    the curvature of the loss along the step actually taken (0 for a zero step, NaN for a non-finite one).  With
    mini-batches the two gradients come from different batches when ``grad_next`` is the next step's gradient, so
    kappa carries gradient noise (for plain SGD ``eta kappa = 1 - <g_{k+1}, g_k> / |g_k|^2``, near 1 where the
    noise dominates); with ``grad_next = grad L_B(theta_{k+1})`` on the step's own batch ``B`` it is the exact
    secant curvature of the batch loss along the step (``quotient_trajectory(..., curvature_batch="same")``)."""
    check_like("directional_curvature", "grad_prev", grad_prev, grad_next=grad_next, step=step)
    grad_prev, grad_next, step = widen(grad_prev), widen(grad_next), widen(step)
    num = tree_dot(grad_next, step) - tree_dot(grad_prev, step)
    return _safe_div(num, tree_sqnorm(step))


@observable(REDUCED_DYNAMICS, "shock_number")
def shock_number(lr, curvature) -> jax.Array:
    """``eta max(0, -kappa)``: characteristics of the coarse-grained flow cross within one step when it reaches
    1 (THEORY section 3-4).  ``lr``: one real number ``>= 0`` (a Python or NumPy one checked: a string failed in
    JAX's arithmetic naming nothing, a negative rate gave a negative shock number, silently)."""
    check_hyper("shock_number", "lr", lr)
    _check_curvature("shock_number", curvature)
    lr, curvature = _rate_and_curvature(lr, curvature)
    return lr * jnp.maximum(-curvature, jnp.zeros_like(curvature))


@observable(REDUCED_DYNAMICS, "fold_number")
def fold_number(lr, curvature) -> jax.Array:
    """``eta max(0, kappa)``: the explicit step map folds at 1 and is unstable at 2 (edge of stability).  ``lr``: as
    for :func:`shock_number`."""
    check_hyper("fold_number", "lr", lr)
    _check_curvature("fold_number", curvature)
    lr, curvature = _rate_and_curvature(lr, curvature)
    return lr * jnp.maximum(curvature, jnp.zeros_like(curvature))


def _rate_and_curvature(lr, curvature):
    """``(lr, curvature)`` as arrays of one floating dtype: the curvature's, at least float32 (bfloat16 / float16
    widened, as the other step observables are; an integer curvature in JAX's default float dtype), with ``lr`` cast
    to it.  Taken as they came, a float16 curvature of 6e4 at ``lr = 2`` gave a fold number of inf (the product in
    float16), and an ``lr`` of another dtype than the curvature (a NumPy float64 learning rate beside a float32
    curvature under x64, a float32 one beside float64) failed under strict promotion with a bare
    ``TypePromotionError``."""
    curvature = widen(jnp.asarray(curvature))
    if not jnp.issubdtype(curvature.dtype, jnp.floating):
        curvature = curvature.astype(jnp.result_type(float))
    return jnp.asarray(lr).astype(curvature.dtype), curvature


def _check_curvature(fn: str, curvature) -> None:
    """``TypeError`` naming ``curvature`` when it is no real number or array (a string failed in a bare "bad operand
    type for unary -: 'str'", ``None`` and booleans likewise or silently)."""
    if isinstance(curvature, bool):
        real = False
    elif isinstance(curvature, (int, float)):
        real = True
    else:
        dtype = getattr(curvature, "dtype", None)
        real = dtype is not None and (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))
    if not real:
        raise TypeError(f"{fn}: curvature must be a real number or an array of real numbers (the directional "
                        f"curvature kappa), got {curvature!r}")


@observable(REDUCED_DYNAMICS, "effective_lr")
def effective_lr(group, params, grads, updates, grads_canonical) -> dict[str, jax.Array]:
    """The step's length on the quotient relative to the gradient's (THEORY section 4).

    - ``"global"``: ``-<g, Delta> / |g_c|^2``, the learning rate a plain gradient step at the canonical
      representative would need for the same first-order loss decrease (``= eta |g|^2 / |g_c|^2`` for SGD).
    - per rescale component, per unit ``j`` with ``a^2 = |w_in,j|^2`` (bias included), ``b^2 = |w_out,j|^2``:
      ``eta_j = -<Delta_j, g_j> (a^2 + b^2) / |g_j|^2`` (sums over the unit's incoming and outgoing slices).
      For an SGD step this is exactly ``eta (a^2 + b^2) = 2 eta sqrt(Q_j^2 + m_j^2)``: the rate at which the
      unit's function component ``m_j = a b`` (orbit part) moves, amplified by its charge
      ``Q_j = (a^2 - b^2) / 2`` (charge part).  ``m_j = a b`` is the orbit invariant (``group.invariants``) of a
      unit whose weights no other rescale touches (one hidden layer).  In a chain of rescales (a deeper MLP)
      the next layer's factors also scale ``b`` (and the previous layer's ``a``): ``a b`` then moves along the
      orbit, a function of (orbit, charges) like ``Q_j``, and ``group.invariants`` (taken at the balanced point
      of the whole chain) is not it.
    - per scale component, per normalised unit: ``-<Delta, g> / (|w|^2 |g|^2)``; ``eta / |w|^2 = eta / (2 Q)``
      for SGD, the effective angular learning rate of a scale-invariant block.

    Every entry is 0 for an update of exact zeros (a step at ``lr = 0``, one that ``optax.apply_if_finite`` skipped
    on a non-finite gradient) and for a unit of zero gradient, and NaN where the step or gradient is not finite
    (a diverged run).
    """
    check_group("effective_lr", group)
    # a step that did not move (an update of exact zeros: lr = 0, a step that optax.apply_if_finite skipped on a
    # non-finite gradient) has rate 0 whatever the gradient; a non-finite step or gradient otherwise gives NaN
    check_like("effective_lr", "params", params, grads=grads, updates=updates, grads_canonical=grads_canonical)
    params, grads, updates, grads_canonical = widen(params), widen(grads), widen(updates), widen(grads_canonical)
    moved = tree_sqnorm(updates) != 0

    def rate(a, b):
        return jnp.where(moved, _safe_div(a, b), jnp.zeros_like(a))

    out = {"global": rate(-tree_dot(grads, updates), tree_sqnorm(grads_canonical))}
    for c in components(group):
        rm = rescale_members(c)
        if rm is not None:
            ins, outs = rm
            members = ins + outs
            w2 = unit_sum((params,), members, jnp.square)
            dg = unit_sum((updates, grads), members, lambda d, g: d * g)
            gg = unit_sum((grads,), members, jnp.square)
            out[c.name] = rate(-dg * w2, gg)
            continue
        sm = scale_members(c)
        if sm is not None:
            w2 = unit_sum((params,), sm, jnp.square)
            dg = unit_sum((updates, grads), sm, lambda d, g: d * g)
            gg = unit_sum((grads,), sm, jnp.square)
            out[c.name] = rate(-dg, w2 * gg)
    return out
