"""Is a 2-D field a gradient?  The discrete curl of an initial field ``p0`` (THEORY section 3).

The 2-D solvers integrate Burgers in the conservative gradient form ``p_t = -grad(|p|^2 / 2) + nu Lap p``, which
is ``p_t + (p . grad) p = nu Lap p`` only when ``p = grad u`` is curl-free: ``(p . grad) p = grad(|p|^2 / 2) -
curl(p) p^perp`` with ``p^perp = (-p_y, p_x)``.  A rotational field would be solved, silently, in another
equation, so the 2-D entry points measure the curl of the field they are given.

**Measure.**  At each node, the curl relative to the field's largest gradient, ``|curl p| / max |grad p|``
(``|grad p|``: the Frobenius norm of the discrete Jacobian at a node; a gradient gives 0, a pure rotation
``p = (-y, x)`` sqrt 2), against a tolerance of its own at that node; the field passes when the curl is within
the tolerance at every node.  The derivatives:

* fourth-order differences, those of ``_shocks._diff`` (central; one-sided five-point stencils at the two nodes
  next to a bounded end): the ones :func:`shock_time` reads the Jacobian with and :func:`slice_flow` builds
  ``grad L`` with.  Differences along different axes commute, so ``curl (D_x u, D_y u) = (D_x D_y - D_y D_x) u``
  vanishes to rounding for every sampled u.  Used for finite volumes (periodic or bounded axes) and by
  :func:`shock_time`.  The two nodes at a bounded end are not compared (see ``_differences``): a bounded axis of
  fewer than 5 nodes is not checked.
* with the spectral scheme (periodic grid), Fourier derivatives as well, the Nyquist modes left out (the
  derivative of a real field's Nyquist mode is not real): the spectral gradient of a periodic u has a spectral
  curl at rounding, ``i k_x (i k_y u_hat) - i k_y (i k_x u_hat) = 0`` mode by mode.  The differences are checked
  too: a field that is not periodic on the grid (a jump at the seam) rings in every Fourier derivative, so the
  spectral tolerance (below) is large for it, while the differences still see a rotation away from the seam.

**Tolerance** (relative, in the units of the measure): rounding plus truncation.

* Rounding: ``eps * max|p|`` times the largest derivative symbol, ``16 k_max`` spectral or ``32 / dx`` for the
  differences, ``eps`` the field's dtype epsilon.  On its own it holds the curl of gradients built by the same
  derivatives from random smooth u: at most 0.16 of it (spectral) and 0.05 (differences), float32 and float64.
* Truncation, for a gradient sampled from an exact ``grad u`` (not built by the same derivatives), or given in a
  precision that rounds it.  For the differences, at each node, 16 times the stencils' leading error estimated
  from the field, ``K |delta_x^5 p_y| / dx + K |delta_y^5 p_x| / dy`` (fifth undivided differences, the larger
  over the two six-node windows around the node, and the largest within 2 nodes along each axis; ``K`` the
  stencil's constant, 1/30 central, 1/20 and 1/5 one-sided).  On a smooth field this is ``16 K h^4 |d^5 p|``,
  16 times the error itself; 16 also covers piecewise smooth gradients (``u = |s|``, ``max(s, 0)^m``: jumps in
  p or in one of its first four derivatives along a curve), whose error near the curve reaches 10 times the
  estimate (1-D, any offset of the jump from the nodes).  Noise (grid-scale content) earns a large allowance: a
  rotation cannot be told from the derivatives' error there.  For the spectral derivatives, a bound on aliasing (modes
  beyond the grid seen in it): 4 ``k_max`` times the largest values of the field's outer band of modes
  (``|m| >= n/2 - ceil(n/10)`` on some axis), exponentially small on a resolved field.

**Measured** (``tests/test_hj_rotational.py`` and the same kinds of field on grids of 8 to 1024 nodes an axis,
float32 and float64): gradients of random smooth u reach at most 0.07 of the tolerance with the spectral
derivatives and 0.09 with the differences when sampled exactly (0.14 for a spectral gradient seen by the
differences); built by the differences from u, at most 0.02 in float32 and 5e-4 in float64, u offset by 100 or 1e4
included; piecewise smooth gradients at most 0.39.  The smallest rotational part refused (a smooth vortex added
to the gradient of a two-mode u on [-1, 1]^2): spectral ~1e-13 relative in float64, ~1e-4 in float32 (64 to 256
nodes an axis); differences 4e-3 (32 nodes), 2.4e-4 (64), 1.5e-5 (128, float64; 7e-5 in float32).
A gradient from second-order differences (``jnp.gradient``) differs from a curl-free field by their O(dx^2)
error, above these tolerances (relative curl 3e-2 on 64 nodes): it is refused.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._custom_types import Array
from ._grid import Grid, Grid2D
from ._shocks import _diff

#: rounding allowance in units of ``eps * max|p|`` times the largest derivative symbol (``k_max`` or ``1 / dx``)
ROUND_SPECTRAL = 16.0
ROUND_DIFFERENCES = 32.0
#: factor on the estimated truncation error of the differences (see the module docstring)
DIFFERENCES_SAFETY = 16.0
#: factor on the aliasing bound of the spectral derivatives
ALIASING_SAFETY = 4.0
#: the truncation estimate at a node is the largest one within this many nodes along each axis
_RADIUS = 2


class CurlMeasure(eqx.Module):
    """The curl of a 2-D field against its tolerance, node by node (see the module docstring); at the node where
    the curl exceeds its tolerance most (or comes closest to it).  Scalars in the field's dtype.

    Attributes:
        ratio: ``|curl p| / tolerance`` there; the field passes when it is at most 1.
        relative_curl: ``|curl p| / max |grad p|`` there (0 for a constant field).
        tolerance, rounding, truncation: the tolerance there and its two parts, relative to ``max |grad p|``.
        worst: the node's flat index.
    """

    ratio: Array
    relative_curl: Array
    tolerance: Array
    rounding: Array
    truncation: Array
    worst: Array


def _error_constants(grid: Grid) -> tuple[int, np.ndarray]:
    """Order k and per-node constant K of the leading error ``K h^k f^(k+1)`` of :func:`_diff` on a 1-D grid."""
    n = grid.n
    if grid.periodic:
        return 4, np.full(n, 1.0 / 30.0)
    if n >= 5:  # central (1, -8, 0, 8, -1) / 12; one-sided (-3, -10, 18, -6, 1) / 12 next to an end, 5-point at it
        k = np.full(n, 1.0 / 30.0)
        k[[1, -2]] = 1.0 / 20.0
        k[[0, -1]] = 1.0 / 5.0
        return 4, k
    k = np.full(n, 1.0 / 6.0)  # 4 nodes: second-order central, one-sided three-point at the ends
    k[[0, -1]] = 1.0 / 3.0
    return 2, k


def _undivided(f: Array, grid: Grid, axis: int, order: int) -> Array:
    """``|delta^order f|`` along ``axis`` at each node, the undivided difference over ``order + 1`` consecutive
    nodes around it (the larger of the two windows when ``order`` is odd); on a bounded axis over the nearest
    window inside it, of at most ``n`` nodes (a lower order on a grid too short for it: larger, conservative)."""
    n = grid.n
    if not grid.periodic:
        order = min(order, n - 1)
    out = None
    for shift in sorted({order // 2, (order + 1) // 2}):
        start = np.arange(n) - shift
        if not grid.periodic:
            start = np.clip(start, 0, n - 1 - order)
        d = jnp.zeros_like(f)
        for j in range(order + 1):
            d = d + (-1) ** (order - j) * math.comb(order, j) * jnp.take(f, (start + j) % n, axis=axis)
        out = jnp.abs(d) if out is None else jnp.maximum(out, jnp.abs(d))
    return out


def _neighbourhood_max(f: Array, grid: Grid2D, radius: int) -> Array:
    """The largest value of ``f`` within ``radius`` nodes along each axis (wrapping on a periodic axis)."""
    for axis, g in enumerate(grid.axes):
        idx = np.arange(g.n)
        out = f
        for s in range(-radius, radius + 1):
            j = (idx + s) % g.n if g.periodic else np.clip(idx + s, 0, g.n - 1)
            out = jnp.maximum(out, jnp.take(f, j, axis=axis))
        f = out
    return f


def _differences(grid: Grid2D, p: Array):
    """Curl, Jacobian norm, and the absolute rounding (a scalar) and truncation (per node) allowances, with the
    differences of ``_diff``."""
    gx, gy = grid.axes
    dxx, dxy = _diff(p[0], gx, 0), _diff(p[0], gy, 1)
    dyx, dyy = _diff(p[1], gx, 0), _diff(p[1], gy, 1)
    curl = dyx - dxy
    jac = jnp.sqrt(dxx * dxx + dxy * dxy + dyx * dyx + dyy * dyy)
    # the error of D_x p_y is K h^k d^(k+1) p_y / dx^(k+1) ~ K delta^(k+1) p_y / h, read off the samples of p_y
    # (not of D_x p_y, whose own end-stencil errors would enter the difference); the largest estimate within
    # _RADIUS nodes, so that a node where the estimate happens to vanish keeps its neighbours' bound
    (ox, kx), (oy, ky) = _error_constants(gx), _error_constants(gy)
    err = (jnp.asarray(kx[:, None] / gx.dx, p.dtype) * _undivided(p[1], gx, 0, ox + 1)
           + jnp.asarray(ky[None, :] / gy.dx, p.dtype) * _undivided(p[0], gy, 1, oy + 1))
    eps = jnp.finfo(p.dtype).eps
    rounding = ROUND_DIFFERENCES * eps * jnp.max(jnp.abs(p)) / min(gx.dx, gy.dx)
    # the two nodes at a bounded end are not compared: their one-sided stencils weigh the end samples by up to
    # 48/12, and a field differenced from a u carries rounding of the level of u there (the end samples' one-sided
    # differences of u), so that its curl at those nodes reaches 6 x the rounding allowance (a gradient built by
    # these differences from random smooth u, float32 / float64) and a third of the whole tolerance (u offset by
    # 1e4, 1024 x 515 nodes) against at most 0.05 and 0.02 at the other nodes; the curl's central stencils next to
    # them still see those samples
    inner = np.ones(grid.shape, bool)
    for axis, g in enumerate(grid.axes):
        if not g.periodic:
            edge = np.zeros(g.n, bool)
            edge[[0, 1, -2, -1]] = True
            inner &= ~(edge[:, None] if axis == 0 else edge[None, :])
    curl = jnp.where(jnp.asarray(inner), curl, jnp.zeros_like(curl))
    return curl, jac, rounding, DIFFERENCES_SAFETY * _neighbourhood_max(err, grid, _RADIUS)


def _spectral(grid: Grid2D, p: Array):
    """Curl, Jacobian norm, and the absolute rounding and aliasing allowances (scalars), with Fourier
    derivatives."""
    gx, gy = grid.axes
    mx = gx.index_frequencies(real=False)[:, None]
    my = gy.index_frequencies(real=True)[None, :]
    kept = (2 * np.abs(mx) != gx.n) & (2 * np.abs(my) != gy.n)  # no Nyquist mode
    outer = (np.abs(mx) >= gx.n / 2 - math.ceil(gx.n / 10)) | (np.abs(my) >= gy.n / 2 - math.ceil(gy.n / 10))
    kx = np.where(kept, 2 * np.pi / gx.length * mx, 0.0)
    ky = np.where(kept, 2 * np.pi / gy.length * my, 0.0)
    phat = jnp.fft.rfftn(p, axes=(-2, -1))

    def d(i, k):
        return jnp.fft.irfftn(jnp.asarray(1j * k, phat.dtype) * phat[i], s=grid.shape, axes=(-2, -1))

    dxx, dxy, dyx, dyy = d(0, kx), d(0, ky), d(1, kx), d(1, ky)
    curl = dyx - dxy
    jac = jnp.sqrt(dxx * dxx + dxy * dxy + dyx * dyx + dyy * dyy)
    kmax = float(np.max(np.sqrt(kx * kx + ky * ky)))
    # aliasing: a mode q beyond the grid, seen at k, adds at most |k| (|p_x_hat(q)| + |p_y_hat(q)|) to the curl's
    # mode k; its amplitude is bounded by that of the outer band of kept modes (a resolved spectrum decays)
    band = jnp.fft.irfftn(jnp.where(jnp.asarray(kept & outer), phat, jnp.zeros_like(phat)), s=grid.shape,
                          axes=(-2, -1))
    amplitude = jnp.sum(jnp.max(jnp.abs(band), axis=(-2, -1)))
    eps = jnp.finfo(p.dtype).eps
    rounding = ROUND_SPECTRAL * eps * kmax * jnp.max(jnp.abs(p))
    return curl, jac, rounding, ALIASING_SAFETY * kmax * amplitude


def _against(curl, jac, rounding, truncation) -> CurlMeasure:
    truncation = jnp.broadcast_to(truncation, curl.shape)
    allowed = rounding + truncation
    top = jnp.max(jac)
    # a zero field (no rounding allowance) has no curl either
    ratio = jnp.abs(curl) / jnp.where(allowed > 0, allowed, jnp.ones_like(allowed))
    worst = jnp.argmax(ratio)
    scale = jnp.where(top > 0, top, jnp.ones_like(top))
    at = (lambda f: f.reshape(-1)[worst] / scale)
    return CurlMeasure(ratio=ratio.reshape(-1)[worst], relative_curl=at(jnp.abs(curl)), tolerance=at(allowed),
                       rounding=rounding / scale, truncation=at(truncation), worst=worst)


@eqx.filter_jit
def measure_curl(p: Array, grid: Grid2D, spectral: bool) -> tuple[CurlMeasure, ...]:
    """The :class:`CurlMeasure` of a field ``p`` of shape ``(2, nx, ny)`` on ``grid`` with the fourth-order
    differences, preceded by the one with spectral derivatives when ``spectral`` (a periodic grid).  Not
    differentiated (``stop_gradient``)."""
    p = jax.lax.stop_gradient(p)
    out = (_against(*_differences(grid, p)),)
    return (_against(*_spectral(grid, p)), *out) if spectral else out


def check_gradient_field(name: str, arg: str, p: Array, grid: Grid2D, *, spectral: bool, advice: str,
                         traced: bool = True) -> Array:
    """``p`` when its curl is within the tolerance at every node (see the module docstring), else an error naming
    ``arg``.

    ``spectral``: measure with the spectral derivatives as well as the fourth-order differences (a periodic grid).
    A known (not traced) field is refused with a ``ValueError`` giving, at the node where the curl exceeds its
    tolerance most, the relative curl, the tolerance and its parts, and ``advice``.  A traced field (under
    ``jit`` / ``vmap``) is checked when the computation runs, through ``equinox.error_if`` on the returned ``p``,
    when ``traced``; else it is returned unchecked.  Only the primal value is measured: derivatives pass through
    unchanged.
    """
    from ._solve import _concrete_value

    # a known field is measured now, also while an outer jit traces the solve around it (a constant there), so that
    # it gets the full message; under jax.grad / jax.jvp outside jit its primal is known
    primal = jax.lax.stop_gradient(p) if isinstance(p, jax.core.Tracer) else p
    if isinstance(primal, jax.core.Tracer) and not traced:
        return p  # (unchecked: nothing measured into the traced program only to be dropped)
    if isinstance(primal, jax.core.Tracer):
        measures = measure_curl(primal, grid, spectral)
    else:
        with jax.ensure_compile_time_eval():
            measures = measure_curl(primal, grid, spectral)
    ratios = [_concrete_value(m.ratio) for m in measures]
    ratios = None if any(r is None for r in ratios) else np.asarray(ratios)
    hows = ("spectral derivatives", "fourth-order differences") if spectral else ("fourth-order differences",)
    if ratios is None:
        return eqx.error_if(
            p, jnp.any(jnp.stack([m.ratio > 1 for m in measures])),
            f"{name}: {arg} is not a gradient field: its curl ({' and '.join(hows)}) exceeds the rounding and "
            f"truncation tolerance at some node. {advice}")
    if not np.any(ratios > 1):
        return p
    k = int(np.argmax(ratios))
    m = measures[k]
    i, j = np.unravel_index(int(m.worst), grid.shape)
    where = f"({grid.gx.lo + grid.gx.dx * i:.4g}, {grid.gy.lo + grid.gy.dx * j:.4g})"
    raise ValueError(
        f"{name}: {arg} is not a gradient field: at x = {where} its curl relative to its largest gradient, "
        f"|curl {arg}| / max|grad {arg}| = {float(m.relative_curl):.3g} ({hows[k]}; 0 for a gradient, 1.41 for a "
        f"pure rotation), exceeds the tolerance there, {float(m.tolerance):.3g} for {jnp.dtype(p.dtype).name} on "
        f"this {grid.shape[0]} x {grid.shape[1]} grid (rounding {float(m.rounding):.2g} + truncation "
        f"{float(m.truncation):.2g}). {advice}")
