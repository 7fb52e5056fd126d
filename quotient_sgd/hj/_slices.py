"""Coarse-graining a network loss on a 1-D or 2-D slice through parameter space (THEORY section 3).

The slice through ``params`` along directions d_1 (, d_2) is ``L(a) = loss_fn(params + a_1 d_1 (+ a_2 d_2))``.
Running the viscous HJ flow on it for time t = eta * k with viscosity nu gives the coarse-grained loss that k
SGD steps of size eta at temperature 2 nu "see" (THEORY's mapping: one step is dt = eta; nu = eta sigma^2/(4B)
by default, but it is an explicit, reported parameter here).  The flow runs in the value form on a bounded grid
with the finite-volume scheme (smooth limiter, so results are differentiable in eta and nu).

Boundary choice: the loss is sampled on a margin beyond the slice ends (``margin`` x extent on each side) and
the flow's ghost cells continue the loss quadratically; the margin is cropped off.  The reported slice is
independent of the boundary treatment as long as information from the boundary cannot reach it by time t:
``reach = t max|p0| + 6 sqrt(nu t) < margin``, reported as ``boundary_ok``.
"""

from __future__ import annotations

import math
from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._custom_types import Array
from ._cole_hopf import _check_loss_and_params
from ._grid import AnyGrid, Grid, Grid2D, is_count
from ._shocks import _diff, find_shocks, shock_time, Shocks
from ._solve import solve_hj


def _directions(directions) -> tuple:
    if isinstance(directions, (tuple, list)):
        if len(directions) not in (1, 2):
            raise ValueError(f"directions: a slice takes 1 or 2 directions, got {len(directions)}.")
        return tuple(directions)
    return (directions,)


def _describe(tree) -> str:
    return str(jax.tree.map(lambda x: tuple(jnp.shape(x)), tree))


def _match_directions(params, directions) -> tuple:
    """The directions as pytrees shaped like ``params``, in ``params``' dtypes.

    Accepted: one pytree like ``params``, a tuple / list of one or two, or one pytree whose leaves carry a leading
    axis of 1 or 2 (the Ritz vectors of ``observables_of(state)`` / ``eigenvectors_of(state)``, ``{"top_...":
    pytree with a leading axis k}``), which is split into that many directions.
    """
    p_leaves, p_def = jax.tree.flatten(params)
    shapes = [tuple(jnp.shape(x)) for x in p_leaves]

    def like_params(d) -> bool:
        leaves, tdef = jax.tree.flatten(d)
        return tdef == p_def and [tuple(jnp.shape(x)) for x in leaves] == shapes

    ds = _directions(directions)
    if len(ds) == 1 and not like_params(ds[0]):
        leaves, tdef = jax.tree.flatten(ds[0])
        ks = {tuple(jnp.shape(x))[:1] for x in leaves}
        if (tdef == p_def and len(ks) == 1 and next(iter(ks)) in ((1,), (2,))
                and [tuple(jnp.shape(x))[1:] for x in leaves] == shapes):
            k = next(iter(ks))[0]
            ds = tuple(jax.tree.map(lambda x, i=i: x[i], ds[0]) for i in range(k))
    for d in ds:
        if not like_params(d):
            raise ValueError(
                f"a slice direction must be a pytree like params (shapes {_describe(params)}), got one with shapes "
                f"{_describe(d)}; for Ritz vectors with a leading axis k pick one (jax.tree.map(lambda v: v[i], "
                "vecs)) or pass a leading axis of 1 or 2; for a flat vector unravel it first "
                "(jax.flatten_util.ravel_pytree(params)[1](vec)).")
    # a float32 Ritz vector through float64 params (or the reverse) must not promote the sample points
    return tuple(jax.tree.map(lambda p, v: jnp.asarray(v).astype(jnp.asarray(p).dtype), params, d) for d in ds)


def _gram(ds) -> Array:
    leaves = [jax.tree.leaves(d) for d in ds]
    # params may mix dtypes (a float64 bias beside float32 kernels): accumulate in the widest
    acc = jnp.float64 if any(x.dtype == jnp.float64 for x in leaves[0]) else jnp.float32
    return jnp.stack([jnp.stack([sum(jnp.sum(x * y).astype(acc) for x, y in zip(a, b)) for b in leaves])
                      for a in leaves])


def _orthonormalize(ds) -> tuple:
    """Gram-Schmidt: the first direction normalised, the second made orthogonal to it and normalised.  A direction
    whose part orthogonal to the ones before is at most ``sqrt(eps)`` of its norm (``eps`` of the accumulation
    dtype) is refused as linearly dependent: that part is rounding error, and normalised it was a direction of
    noise, not orthogonal to the first ((d, 2 d) in float32 gave a Gram matrix off-diagonal of -0.76).  Traced
    directions (under ``jax.jit`` / ``vmap``) are checked the same way through ``equinox.error_if`` when the
    computation runs: unchecked, (d, d / 3) in float64 flowed on a pair with Gram off-diagonal -0.45 without a word,
    and a zero direction was reported as a non-finite initial field of ``solve_hj``."""
    out = []
    for i, d in enumerate(ds):
        n0 = jnp.sqrt(_gram((d,))[0, 0])
        for e in out:
            c = _gram((d, e))[0, 1]
            d = jax.tree.map(lambda x, y: x - c.astype(x.dtype) * y, d, e)
        n = jnp.sqrt(_gram((d,))[0, 0])
        if isinstance(n, jax.core.Tracer) or isinstance(n0, jax.core.Tracer):
            root_eps = jnp.sqrt(jnp.finfo(n.dtype).eps)
            d = eqx.error_if(
                d, ~(n > root_eps * n0),
                f"slice_flow(orthonormalize=True): direction {i} is zero or linearly dependent on the one(s) before "
                "it (its part orthogonal to them is within rounding, sqrt(eps), of its norm); pass independent "
                "directions.")
        elif not float(n) > float(jnp.sqrt(jnp.finfo(n.dtype).eps)) * float(n0):
            what = "zero" if not float(n0) > 0 else (
                f"linearly dependent on the one before it: its part orthogonal to it is {float(n) / float(n0):.3g} "
                f"of its norm, within rounding (sqrt(eps) = {float(jnp.sqrt(jnp.finfo(n.dtype).eps)):.3g})")
            raise ValueError(f"slice_flow(orthonormalize=True): direction {i} is {what}; pass independent "
                             "directions.")
        out.append(jax.tree.map(lambda x: x / n.astype(x.dtype), d))
    return tuple(out)


def _check_slice(name: str, loss_fn, params) -> None:
    """``ValueError`` naming the argument when ``params`` has no leaves or a leaf that is not floating point (the
    directions were cast to its dtype: an integer leaf truncated the coefficients a to 0 and the slice came out
    flat), or when ``loss_fn(params)`` is not a real scalar (a loss of shape (1,) gave a slice of shape (n, 1) and
    ``slice_flow`` a ``solve_hj`` error about an ``u0`` it was never given)."""
    _check_loss_and_params(name, loss_fn, params, centre="the centre of the slice", number_ok=True,
                           why_float="the slice moves every parameter by a . direction, in its dtype")


def _leaves_as_arrays(params):
    """``params`` with every leaf a JAX array (a Python float leaf, e.g. ``params=0.3`` or ``[0.3, -1.2]``, in the
    default float, as :func:`_check_slice` reads it): the slice moved each leaf as ``p + c.astype(p.dtype)``, and a
    float leaf failed there in a bare ``AttributeError: 'float' object has no attribute 'dtype'``."""
    return jax.tree.map(jnp.asarray, params)


def _check_grid(name: str, grid) -> None:
    if not isinstance(grid, (Grid, Grid2D)):
        got = f"{type(grid).__name__} of shape {np.shape(grid)}" if hasattr(grid, "shape") else repr(grid)
        raise ValueError(f"{name}: grid={got} is not allowed; need a Grid (one direction) or Grid2D (two), e.g. "
                         "Grid(n, -extent, extent, periodic=False).")


def loss_slice(loss_fn: Callable, params, directions, grid: AnyGrid) -> Array:
    """Sample ``loss_fn(params + a . directions)`` on ``grid`` (a ``Grid`` for one direction, ``Grid2D`` for two).

    ``directions``: a pytree like ``params``, a tuple of one or two, or a pytree with a leading axis of 1 or 2
    (Ritz vectors as ``eigenvectors_of(state)`` keeps them); used as given (not normalised): ``a`` is the
    coefficient of each direction.  ``params`` must have floating-point leaves and ``loss_fn(params)`` must be a
    real scalar, and ``grid`` a :class:`Grid` / :class:`Grid2D`; otherwise a ``ValueError`` names the argument.
    """
    _check_grid("loss_slice", grid)
    _check_slice("loss_slice", loss_fn, params)
    params = _leaves_as_arrays(params)
    ds = _match_directions(params, directions)
    if len(ds) != grid.ndim:
        raise ValueError(f"loss_slice: {len(ds)} direction(s) need a {len(ds)}-D grid, got a {grid.ndim}-D one.")
    return _sample(loss_fn, params, ds, grid)


def _sample(loss_fn: Callable, params, ds: tuple, grid: AnyGrid) -> Array:
    """:func:`loss_slice` after its checks, with the directions matched to ``params``."""

    def at(coef):
        shifted = params
        for c, d in zip(coef, ds):
            shifted = jax.tree.map(lambda p, v: p + c.astype(p.dtype) * v, shifted, d)
        return loss_fn(shifted)

    if grid.ndim == 1:
        return jax.vmap(lambda a: at((a,)))(grid.x)
    pts = jnp.moveaxis(grid.x, 0, -1).reshape(-1, 2)
    return jax.vmap(lambda a: at((a[0], a[1])))(pts).reshape(grid.shape)


class SliceFlow(eqx.Module):
    """Result of :func:`slice_flow` on the requested slice (margin cropped).

    Attributes:
        grid: the slice grid (bounded), coordinates a along the directions.
        loss: L on the slice; ``u``: coarse-grained loss at t; ``p``: its gradient (``(n,)`` or ``(2, n, n)``).
        t, nu: the coarse-graining time eta * k and viscosity used.
        shock_time: inviscid shock time of the slice's initial gradient field.
        shocks: :class:`Shocks` of p at t (1-D slices; None in 2-D).  A front whose jump is within the error the
            flow leaves in p, ``3 (8 eps max|u| + rtol max|u - mean L| + atol) / dx`` (the tolerance terms with
            adaptive steps only; ``eps`` of the loss's dtype), is not reported (``valid`` False): p is the
            fourth-order derivative of u, which turns the solve's error and rounding into steep little wiggles (on
            the linear loss ``1 + a``, whose flow never forms a shock, float32 reported two shocks of jump 2.6e-5
            and 1e-5; ``1000 + 0.3 a`` in float64 one of 1.3e-7).
        reach, boundary_ok: distance information travels from the boundary, and whether it stays in the margin
            (always at ``reach = 0``: at t = 0 the slice is the loss itself, whatever the margin).
    """

    grid: AnyGrid
    loss: Array
    u: Array
    p: Array
    t: Array
    nu: Array
    shock_time: Array
    shocks: Shocks | None
    reach: Array
    boundary_ok: Array


def slice_flow(loss_fn: Callable, params, directions, *, extent: float, n: int, eta, k, nu, margin: float = 0.5,
               scheme="fv-smooth", solver: str = "tsit5", rtol: float = 1e-6, atol: float = 1e-8,
               max_steps: int = 16384, max_shocks: int = 8, dt=None, orthonormalize: bool = False) -> SliceFlow:
    """Coarse-grain a loss on a slice: HJ flow for t = eta * k at viscosity nu, then report shocks.

    Args:
        loss_fn: ``loss_fn(params) -> scalar``.
        params: the centre point (pytree).
        directions: a pytree like params, a tuple of one or two, or a pytree with a leading axis of 1 or 2 (Lanczos
            eigenvectors as ``eigenvectors_of(state)`` keeps them).  They must be orthonormal: the flow runs in the
            slice coordinates ``a`` with the Euclidean metric, which is the parameters' metric restricted to the
            slice (so that k steps of size eta are the time eta * k, THEORY section 3) only when the directions
            are orthonormal; along a direction of norm s a step of size eta moves ``a`` as a step of size
            eta / s^2 would, and the shock time seen in ``a`` is divided by s^2.  Concrete directions that
            are not orthonormal (to 1e-3) are refused; under ``jax.jit`` the check runs inside (``eqx.error_if``).
        extent: the slice covers ``a in [-extent, extent]`` along each direction, with ``n`` points.
        eta, k, nu: step size, number of steps, viscosity (differentiable in eta and nu): scalars, finite and
            >= 0; known values out of range are refused with a ``ValueError`` naming them, traced ones (under
            ``jax.jit`` / ``vmap`` / ``grad``) through ``equinox.error_if`` when the computation runs.
        margin: extra sampled region on each side, as a fraction of ``extent``.
        scheme, solver, rtol, atol, max_steps, dt: as :func:`solve_hj` (bounded grid: finite volumes only; known
            tolerances below the sampled loss's resolution, ``rtol + atol / S < eps / 16``, are refused there;
            ``dt`` selects fixed steps, whose derivatives in eta and nu are those of the map finite differences
            see as long as ``ceil(eta k / dt)`` does not change).
        orthonormalize: orthonormalise the directions first (Gram-Schmidt, in the given order) instead of refusing
            directions that are not orthonormal; a zero direction, or one dependent on the one before it to within
            rounding, is refused (traced ones through ``equinox.error_if``).

    ``loss_fn`` must be finite on the sampled slice, margin included: a NaN or infinite value there is refused
    naming ``loss_fn`` (and, for known values, the first such point).
    """
    if not isinstance(orthonormalize, (bool, np.bool_)):  # "no" is True: it orthonormalised
        raise ValueError(f"slice_flow: orthonormalize={orthonormalize!r} is not allowed; need True or False.")
    _check_slice("slice_flow", loss_fn, params)
    params = _leaves_as_arrays(params)
    ds = _match_directions(params, directions)
    if orthonormalize:
        ds = _orthonormalize(ds)
    else:
        gram = _gram(ds)
        bad = jnp.max(jnp.abs(gram - jnp.eye(len(ds), dtype=gram.dtype)))
        if isinstance(bad, jax.core.Tracer):
            ds = eqx.error_if(ds, bad > 1e-3, "slice_flow: the directions are not orthonormal; pass orthonormal "
                              "directions or orthonormalize=True.")
        elif not float(bad) <= 1e-3:
            raise ValueError(
                f"slice_flow: the directions are not orthonormal (Gram matrix {np.round(np.asarray(gram), 6).tolist()})"
                "; the flow's time t = eta * k holds in the slice coordinates only for orthonormal directions (a "
                "direction of norm s divides the shock time by s^2).  Normalise them or pass orthonormalize=True.")
    dim = len(ds)
    from ._solve import _check_real, _concrete_value

    _check_real("slice_flow", eta=eta, k=k, nu=nu)
    for arg, value in (("eta", eta), ("k", k), ("nu", nu)):
        if jnp.ndim(value) != 0:  # (an array of etas was reported as solve_hj's t1)
            raise ValueError(f"slice_flow: {arg} must be a scalar, got shape {jnp.shape(value)}; for several values "
                             f"jax.vmap slice_flow over {arg}.")
    for arg, value in (("eta", eta), ("k", k), ("nu", nu)):
        a = _concrete_value(value)  # None when traced (checked in _flow)
        if a is not None and not (np.all(np.isfinite(a)) and np.all(a >= 0)):
            raise ValueError(f"slice_flow: {arg}={value!r} is not allowed; need a finite number >= 0 (the flow runs "
                             "for t = eta * k >= 0 at viscosity nu >= 0).")
    if not is_count(n, 4):  # (None failed in a bare int() TypeError)
        raise ValueError(f"slice_flow: n={n!r} is not allowed; need an integer >= 4 points along each direction.")
    if not (_real(extent) and np.isfinite(extent) and extent > 0) or not (_real(margin) and np.isfinite(margin)
                                                                             and margin >= 0):
        raise ValueError(f"slice_flow: extent={extent!r}, margin={margin!r} are not allowed; need a finite "
                         "extent > 0 and margin >= 0 (plain numbers: they fix the grid, so they cannot be traced).")
    n = int(n)
    dx = 2 * extent / (n - 1)
    # Python arithmetic (the grid size is static, also under jax.jit); the slack absorbs rounding of the ratio
    pad = math.ceil(margin * extent / dx - 1e-9)
    lo, hi = -extent - pad * dx, extent + pad * dx
    g1 = Grid(n + 2 * pad, lo, hi, periodic=False)
    crop1 = Grid(n, -extent, extent, periodic=False)
    ext, crop = (g1, crop1) if dim == 1 else (Grid2D(g1, g1), Grid2D(crop1, crop1))
    # the array work as one compiled program (op by op, sampling the loss and locating the shocks dispatched a few
    # hundred small ops: ~6.5 s a call against ~2.6 s); eta, k, nu stay inputs (one program for every value)
    # known tolerances and step sizes as plain numbers: fixed in the program, and checked by solve_hj as it traces
    rtol, atol, dt = (_plain(v) for v in (rtol, atol, dt))
    # counts as Python ints: they size the program (step budget, shock slots), so they must not be traced; a NumPy
    # integer (np.int64(1000)) is an array to the compiled program, which traced it, and solve_hj / find_shocks
    # refused "max_steps=JitTracer(int32[])"
    max_steps, max_shocks = _count(max_steps), _count(max_shocks)
    args = (loss_fn, params, tuple(ds), jnp.asarray(eta), jnp.asarray(k), jnp.asarray(nu), ext, crop, pad, dx, dim,
            scheme, solver, rtol, atol, max_steps, max_shocks, dt)
    try:  # what keys the compiled program's cache (the grids and counts are hashable by construction)
        hash((loss_fn, scheme, solver, rtol, atol, dt))
    except TypeError:  # an unhashable loss_fn or scheme (or traced tolerances, under an outer jit): op by op
        return _flow(*args)
    return _flow_jit(*args)


def _real(value) -> bool:
    """``value`` is a known real number (a Python, NumPy or 0-d JAX one; not a bool, a string or a traced value):
    a string failed in a bare ``isfinite`` error and ``True`` was read as 1."""
    if isinstance(value, (bool, np.bool_, str, bytes)):
        return False
    try:
        a = np.asarray(value)
    except Exception:  # noqa: BLE001 - traced, or not array-like
        return False
    return a.ndim == 0 and a.dtype.kind in "iuf"


def _count(value):
    """A known integer scalar (a NumPy integer, a 0-d integer array) as a Python int; anything else as it is (checked
    by the function it is handed to, with the value as given)."""
    if isinstance(value, (bool, np.bool_, int)):
        return value
    try:
        a = np.asarray(value)
    except Exception:  # noqa: BLE001 - traced, or not array-like
        return value
    return int(a) if a.ndim == 0 and a.dtype.kind in "iu" else value


def _plain(value):
    """A known (not traced) scalar array as a Python float; anything else (None, traced values) as it is."""
    from ._solve import _concrete_value

    if value is None or isinstance(value, (int, float)):
        return value
    a = _concrete_value(value)
    return float(a) if a is not None and a.ndim == 0 else value


def _flow(loss_fn, params, ds, eta, k, nu, ext, crop, pad, dx, dim, scheme, solver, rtol, atol, max_steps,
          max_shocks, dt) -> SliceFlow:
    """:func:`slice_flow` after its argument checks: the coarse-grained slice on the padded grid ``ext``, cropped
    to ``crop``."""
    n = crop.shape[0]
    # traced eta, k, nu escape slice_flow's range checks (under jax.jit / vmap / grad): a negative eta and k gave a
    # positive t = eta * k and flowed without a word, a negative eta alone was reported as solve_hj's t1
    eta, k, nu = eqx.error_if(
        (eta, k, nu), ~(jnp.isfinite(eta) & jnp.isfinite(k) & jnp.isfinite(nu) & (eta >= 0) & (k >= 0) & (nu >= 0)),
        "slice_flow: a traced eta, k or nu is out of range; need finite eta >= 0, k >= 0 and nu >= 0 (the flow "
        "runs for t = eta * k >= 0 at viscosity nu >= 0).")
    l_ext = _sample(loss_fn, params, ds, ext)
    # a loss that is NaN or infinite somewhere on the sampled slice was reported as solve_hj's "initial field"
    sampled = (f"a in [{ext.lo:.6g}, {ext.hi:.6g}]" if dim == 1 else
               f"a in [{ext.gx.lo:.6g}, {ext.gx.hi:.6g}]^2") + " (the slice and its margin)"
    finite = jnp.all(jnp.isfinite(l_ext))
    if isinstance(finite, jax.core.Tracer):
        l_ext = eqx.error_if(l_ext, ~finite, f"slice_flow: loss_fn is not finite (NaN or infinite) at some point of "
                             f"{sampled}; make it finite there, or take a smaller extent or margin.")
    elif not bool(finite):
        bad = np.flatnonzero(~np.isfinite(np.asarray(l_ext)).reshape(-1))[0]
        at = np.asarray(jnp.moveaxis(ext.x, 0, -1).reshape(-1, 2) if dim == 2 else ext.x)[bad]
        raise ValueError(f"slice_flow: loss_fn is {np.asarray(l_ext).reshape(-1)[bad]} at a = {np.round(at, 6)} of "
                         f"{sampled}; make it finite there, or take a smaller extent or margin.")
    dtype = l_ext.dtype
    t = jnp.asarray(eta, dtype) * jnp.asarray(k, dtype)
    nu = jnp.asarray(nu, dtype)
    sol = solve_hj(l_ext, ext, nu=nu, t1=t, scheme=scheme, solver=solver, rtol=rtol, atol=atol,
                   max_steps=max_steps, dt=dt)
    sl = (slice(pad, pad + n),) * dim
    u = sol.us[-1][sl]
    loss = l_ext[sl]

    def grad(f, g):
        if dim == 1:
            return _diff(f, g, 0)
        return jnp.stack([_diff(f, g.gx, 0), _diff(f, g.gy, 1)])

    p0_ext = grad(l_ext, ext)
    p = grad(u, crop)
    p0 = grad(loss, crop)
    reach = t * jnp.max(jnp.abs(p0_ext)) + 6 * jnp.sqrt(nu * t)
    shocks = None
    if dim == 1:
        shocks = find_shocks(p, crop, max_shocks=max_shocks)
        # find_shocks is free of the units of p, so the solve's error in u (its tolerances, adaptive steps only) and
        # rounding, turned by the derivative stencil (gain 1.5 / dx) into wiggles of p, were reported as fronts:
        # the linear loss 1 + a (no shock ever) gave two in float32.  A front's jump must exceed twice that noise
        u_ext = jax.lax.stop_gradient(sol.us[-1])
        noise = 8 * jnp.finfo(dtype).eps * jnp.max(jnp.abs(u_ext))
        if dt is None:
            noise = noise + jnp.asarray(rtol, dtype) * jnp.max(jnp.abs(u_ext - jnp.mean(l_ext))) + jnp.asarray(
                atol, dtype)
        shocks = eqx.tree_at(lambda sh: sh.valid, shocks,
                             shocks.valid & (jnp.abs(shocks.jump) > 3 * noise / jnp.asarray(dx, dtype)))
    return SliceFlow(grid=crop, loss=loss, u=u, p=p, t=t, nu=nu, shock_time=shock_time(p0, crop),
                     shocks=shocks, reach=reach, boundary_ok=(reach < pad * dx) | (reach == 0))


_flow_jit = eqx.filter_jit(_flow)
