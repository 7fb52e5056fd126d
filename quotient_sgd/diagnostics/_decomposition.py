"""What the step sees, split into the function's own curvature and the gauge (charge) part (THEORY section 4).

For a linear action and the canonical element ``k`` (``theta_c = k . theta``), invariance ``L(theta) =
L(k . theta)`` gives the exact transport of the Hessian

    H(theta) = J_k^T H(theta_c) J_k,          J_k the (constant) Jacobian of ``phi -> k . phi``,

so the sharpness the step sees, ``lambda_step = lambda_max(P H(theta) P)``, is the canonical sharpness
``lambda_canonical`` (an orbit invariant: the function's own curvature) times a gauge factor
``gauge_factor = lambda_step / lambda_canonical`` that depends on where on the orbit the charges put theta.
The charges predict it: when ``H(theta_c)`` is dominated by its top eigenpair ``(lambda_c, v_c)`` (as at the edge
of stability), ``H(theta) ~ lambda_c w w^T`` with ``w = J_k^T v_c`` horizontal at theta, hence

    gauge_factor_charges = |J_k^T v_c|^2.

For one rescale unit without biases (a 1-1-1 deep linear chain) with ``|w_in| = a``, ``|w_out| = b`` at a critical
point this is exact:
``(a^2 + b^2) / (2 a b) = sqrt(Q^2 + m^2) / m`` -- the effective learning rate ``eta (a^2 + b^2) = 2 eta
sqrt(Q^2 + m^2)`` over the balanced one ``2 eta m``.
"""

from __future__ import annotations

import numbers
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .._tree import widen
from ..observables import sharpness_horizontal, sharpness_quotient, sharpness_raw
from ._series import real_kind


def _sq(t) -> jax.Array:
    return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(t))


def _is_group(group) -> bool:
    return all(callable(getattr(group, a, None)) for a in ("canonical_element", "canonicalize", "act", "tangents"))


def _check_group(fn: str, signature: str, group) -> None:
    """``TypeError`` naming ``fn`` unless ``group`` is a symmetry group (``model.symmetries()``): anything else failed
    in a bare "'str' object has no attribute 'canonical_element'" (or, a group and a loss function swapped, in
    JAX's "Expected a callable value, got Product(...)")."""
    if not _is_group(group):
        raise TypeError(f"{fn}{signature}: group must be a symmetry group (model.symmetries()), got a "
                        f"{type(group).__name__}")


def gauge_transport(group, params, v_canonical):
    """``J_k^T v`` with ``k`` the canonical element at ``params``: a horizontal vector at the canonical point
    transported to ``params`` (the covariant transport of gradients / Hessian eigenvectors).

    Raises:
        ValueError: ``v_canonical`` not a tree of the structure of ``params`` with a leaf of each parameter's shape
            (the message names the first leaf that differs; a vector of another shape failed in JAX's bare
            "unexpected tree structure" or "unexpected JAX type" of the VJP).

    Computed in the parameters' floating dtypes, at least float32 (bfloat16 / float16 parameters are widened, as
    for the other observables): ``v_canonical`` is cast to them (a float32 vector on bfloat16 parameters failed in
    the VJP's bare "expected bfloat16"), and the result is in them.

    Raises (also): TypeError: ``group`` not a symmetry group (``model.symmetries()``; a string or a loss function
    failed in a bare "object has no attribute 'canonical_element'")."""
    _check_group("gauge_transport", "(group, params, v_canonical)", group)
    params = widen(params)
    v_canonical = _like_params("gauge_transport", params, v_canonical)
    k = group.canonical_element(params)
    _, vjp = jax.vjp(lambda th: group.act(k, th), params)
    (u,) = vjp(v_canonical)
    return u


def _like_params(fn: str, params, v):
    """``v`` as a tree of the structure, leaf shapes and dtypes of ``params``, else ValueError naming it."""
    p_paths, p_def = jax.tree_util.tree_flatten_with_path(params)
    v_leaves, v_def = jax.tree.flatten(v)
    if v_def != p_def:
        raise ValueError(f"{fn}: v_canonical is not allowed: it must have the tree structure of params (a "
                         f"{type(params).__name__} of {p_def.num_leaves} arrays); got a {type(v).__name__} of "
                         f"{v_def.num_leaves} of another structure")
    out = []
    for (path, x), y in zip(p_paths, v_leaves):
        y = jnp.asarray(y)
        if y.shape != jnp.shape(x) or not jnp.issubdtype(y.dtype, jnp.floating):
            raise ValueError(f"{fn}: v_canonical is not allowed: its leaf {jax.tree_util.keystr(path)} has shape "
                             f"{y.shape} and dtype {y.dtype}; need the parameter's shape {jnp.shape(x)} (floating "
                             f"point)")
        out.append(y.astype(jnp.result_type(x)))
    return jax.tree.unflatten(p_def, out)


def stability_decomposition(loss_fn: Callable, group, params, lr=None, *, key, num_matvecs: int = 20,
                            raw: bool = True) -> dict[str, jax.Array]:
    """The stability decomposition at ``params`` (jit-able; three Lanczos runs of ``num_matvecs`` HVPs).

    Returns ``{"sharpness_horizontal", "sharpness_quotient", "sharpness_raw", "lambda_min_horizontal",
    "lambda_min_quotient", "gauge_factor", "gauge_factor_charges"}`` and, with ``lr``,
    ``"lr_times_lambda_step"`` (= ``lr * lambda_canonical * gauge_factor``, the number that crosses 2 at the
    edge of stability).  Keys match the trajectory keys the detectors read.

    Called outside ``jit`` it runs as one compiled program (cached per ``loss_fn``, ``group``, ``num_matvecs``,
    ``raw`` and the shapes; op by op it took ~3x longer); an unhashable ``loss_fn`` or ``group`` runs op by op.

    Raises:
        ValueError: ``loss_fn`` not returning one real number at ``params`` (a per-example loss, a ``(loss, aux)``
            pair: JAX's bare "Gradient only defined for scalar-output functions"), ``num_matvecs`` not an integer
            ``>= 1`` (0 or -1 was refused by the Lanczos routine as ``k=1 > num_matvecs``, 2.5 or True with a
            TypeError, none naming this function), ``raw`` not a bool
            (``raw="no"`` is truthy: the raw sharpness was computed), or a concrete ``lr`` that is not a finite
            number ``>= 0`` (``"0.1"`` failed in a bare JAX TypeError; ``-1`` and NaN gave a negative or NaN
            ``lr_times_lambda_step``); a traced ``lr`` (under ``jit`` / ``vmap``) is used as it comes.
        TypeError: ``key`` not an array (a PRNG key: ``jax.random.key(0)`` or ``jax.random.PRNGKey(0)``),
            ``loss_fn`` not a function or ``group`` not a symmetry group (the two swapped failed in JAX's bare
            "Expected a callable value, got Product(...)").
    """
    if _is_group(loss_fn) or not callable(loss_fn):
        raise TypeError(f"stability_decomposition(loss_fn, group, params, ...): loss_fn must be a function params -> "
                        f"loss, got a {type(loss_fn).__name__}" + (" (a symmetry group: the loss function comes "
                                                                    "first)" if _is_group(loss_fn) else ""))
    _check_group("stability_decomposition", "(loss_fn, group, params, ...)", group)
    _check_arguments(lr, num_matvecs, raw)
    if not (hasattr(key, "dtype") and hasattr(key, "shape")):
        # (a string failed in jit's bare "Error interpreting argument to <function _decomposition ...> as an
        # abstract array ... passed to the function at path key"; None and numbers in the Lanczos routine's words)
        raise TypeError(f"stability_decomposition: key={key!r} is not allowed; need one PRNG key, e.g. "
                        "jax.random.key(0) (it draws the Lanczos start vectors)")
    try:
        hash((loss_fn, group))
    except TypeError:
        return _decomposition(loss_fn, group, params, lr, key, num_matvecs, raw)
    return _decomposition_jit(loss_fn, group, params, lr, key, num_matvecs, raw)


def _check_arguments(lr, num_matvecs, raw) -> None:
    """:func:`stability_decomposition`'s argument checks (see its Raises)."""
    if isinstance(num_matvecs, (bool, np.bool_)) or not isinstance(num_matvecs, numbers.Integral) \
            or num_matvecs < 1:
        raise ValueError(f"stability_decomposition: num_matvecs={num_matvecs!r} is not allowed; need an integer >= 1 "
                         "(Hessian-vector products of each Lanczos run)")
    if not isinstance(raw, (bool, np.bool_)):
        raise ValueError(f"stability_decomposition: raw={raw!r} is not allowed; need True or False (also compute the "
                         "raw sharpness)")
    if lr is None or isinstance(lr, jax.core.Tracer):
        return
    try:
        a = np.asarray(lr)
    except Exception:  # noqa: BLE001 - not array-like: reported below
        a = None
    ok = a is not None and a.ndim == 0 and real_kind(a.dtype) in "iuf" and bool(np.isfinite(a)) and float(a) >= 0
    if not ok:
        raise ValueError(f"stability_decomposition: lr={lr!r} is not allowed; need None or a finite number >= 0 (the "
                         "learning rate of lr_times_lambda_step)")


def _decomposition(loss_fn, group, params, lr, key, num_matvecs, raw):
    # (at trace time: once per compilation) a loss of another shape, or a (loss, aux) pair, failed in JAX's bare
    # "Gradient only defined for scalar-output functions" of the Hessian-vector product
    out = jax.eval_shape(loss_fn, params)
    if not (hasattr(out, "shape") and out.shape == () and jnp.issubdtype(out.dtype, jnp.floating)):
        shown = jax.tree.map(lambda a: f"{a.dtype}{list(a.shape)}", out)
        raise ValueError(f"stability_decomposition: loss_fn must return the loss at params, one real number (shape "
                         f"()); it returns {shown} (a per-example loss: take its mean; a (loss, aux) pair: return the "
                         f"loss alone)")
    eq = sharpness_quotient(loss_fn, group, params, key=key, num_matvecs=num_matvecs)
    es = sharpness_horizontal(loss_fn, group, params, key=key, num_matvecs=num_matvecs)
    lam_c, lam_s = eq.top[0], es.top[0]
    v_c = jax.tree.map(lambda x: x[0], eq.top_vectors)
    v_c_sq = _sq(v_c)
    w = gauge_transport(group, params, v_c)
    out = {
        "sharpness_horizontal": lam_s,
        "sharpness_quotient": lam_c,
        "lambda_min_horizontal": es.bottom[0],
        "lambda_min_quotient": eq.bottom[0],
        "gauge_factor": lam_s / lam_c,
        "gauge_factor_charges": _sq(w) / v_c_sq,
    }
    if raw:
        out["sharpness_raw"] = sharpness_raw(loss_fn, params, key=key, num_matvecs=num_matvecs).top[0]
    if lr is not None:
        out["lr_times_lambda_step"] = jnp.asarray(lr, lam_s.dtype) * lam_s
    return out


_decomposition_jit = jax.jit(_decomposition, static_argnums=(0, 1, 5, 6))
