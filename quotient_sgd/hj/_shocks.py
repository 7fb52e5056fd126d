"""Shock times and shock detection (THEORY section 3).

Inviscid shock time: characteristics x = y + t p0(y) first cross at t* = 1 / max(0, -min p0'), in d
dimensions t* = 1 / max(0, -lambda_min(grad p0)) (grad p0 = Hessian of the loss, symmetric).

A viscous shock is a front of width O(nu / jump) across which p drops from p_left to p_right.  It moves at the
Rankine-Hugoniot speed s = (p_left + p_right) / 2 and is admissible (Oleinik) when p_left > p_right; a jump
with p_left < p_right is an expansion, which spreads into a rarefaction fan and is not a shock.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._custom_types import Array
from ._grid import AnyGrid, Grid, Grid2D, is_count, real_field


def _real_field(name: str, arg: str, p, grid) -> Array:
    """``p`` as a real floating array, after checking ``grid``: integer and boolean fields in the default float,
    half-precision ones in float32 (as the solvers do); a complex field is refused by name."""
    if not isinstance(grid, (Grid, Grid2D)):
        raise ValueError(f"{name}: grid={grid!r} is not allowed; need a Grid (1-D)"
                         + (" or Grid2D." if name == "shock_time" else "."))
    return real_field(name, arg, p)


def _diff(p: Array, g: Grid, axis: int, *, end_order: int = 4) -> Array:
    """Fourth-order central derivative along ``axis``.

    On a bounded grid, the two nodes at each end take one-sided five-point stencils (fourth order, for smooth
    fields) or, with ``end_order=2`` or on fewer than 5 points, second-order ones (central next to the end,
    one-sided three-point at it): :func:`find_shocks` uses those, since the wider stencils ring next to a front.
    """
    n, dx = g.n, g.dx
    if g.periodic:
        def sh(k):
            return jnp.take(p, (np.arange(n) + k) % n, axis=axis)

        return (8 * (sh(1) - sh(-1)) - (sh(2) - sh(-2))) / (12 * dx)
    p = jnp.moveaxis(p, axis, 0)
    inner = (8 * (p[3:-1] - p[1:-3]) - (p[4:] - p[:-4])) / (12 * dx)  # nodes 2 .. n - 3
    if end_order == 4 and n >= 5:  # fourth order everywhere: one-sided five-point stencils at 0, 1, n - 2, n - 1
        first = (-25 * p[0] + 48 * p[1] - 36 * p[2] + 16 * p[3] - 3 * p[4]) / (12 * dx)
        near0 = (-3 * p[0] - 10 * p[1] + 18 * p[2] - 6 * p[3] + p[4]) / (12 * dx)
        near1 = (3 * p[-1] + 10 * p[-2] - 18 * p[-3] + 6 * p[-4] - p[-5]) / (12 * dx)
        last = (25 * p[-1] - 48 * p[-2] + 36 * p[-3] - 16 * p[-4] + 3 * p[-5]) / (12 * dx)
    else:  # second order
        near0, near1 = (p[2] - p[0]) / (2 * dx), (p[-1] - p[-3]) / (2 * dx)
        first = (-3 * p[0] + 4 * p[1] - p[2]) / (2 * dx)
        last = (3 * p[-1] - 4 * p[-2] + p[-3]) / (2 * dx)
    return jnp.moveaxis(jnp.concatenate([first[None], near0[None], inner, near1[None], last[None]]), 0, axis)


def _slope_floor(p: Array, g: Grid) -> Array:
    """Per node of a 1-D field, the lowest derivative its samples allow there: the smallest slope ``s_j = (p_{j+1} -
    p_j) / dx`` of the four cells the central stencil spans (``i - 2 .. i + 1``), less the smallest magnitude of the
    second differences ``s_{j+1} - 2 s_j + s_{j-1}`` at cells ``i - 2 .. i + 1`` (those a grid holds; ``-inf`` at
    the two nodes next to each end of a bounded grid, whose one-sided stencils are not bounded).

    For a smooth field the bound lies below the derivative: at a minimum of ``p' = m + c (x - x_i)^2 / 2`` the cell
    slopes are at least ``m + c dx^2 / 6`` and the second differences ``c dx^2``, so the bound is ``m - 5 c dx^2 /
    6``, and off a minimum the smaller slope lies below ``p'`` already: the fourth-order estimate is left as it is.
    Beside a kink or a jump some cell on the smooth side has a zero second difference, and the bound is the
    smallest cell slope: the stencil's ringing below it (an expansion step J read as the compression -J / (12 dx), a
    kink from slope -1 to 0 as -1.125 with the parabola) is not a slope of the samples."""
    n, dx = g.n, g.dx
    if g.periodic:
        s = (jnp.roll(p, -1) - p) / dx  # s[j]: the cell between nodes j and j + 1

        def sh(a, k):  # sh(a, k)[i] = a[i + k]
            return jnp.roll(a, -k)

        d2 = jnp.abs(sh(s, 1) - 2 * s + sh(s, -1))
        lowest = jnp.minimum(jnp.minimum(sh(s, -2), sh(s, -1)), jnp.minimum(s, sh(s, 1)))
        return lowest - jnp.minimum(jnp.minimum(sh(d2, -2), sh(d2, -1)), jnp.minimum(d2, sh(d2, 1)))
    s = (p[1:] - p[:-1]) / dx  # cells 0 .. n - 2
    inf = jnp.full((1,), jnp.inf, p.dtype)
    d2 = jnp.concatenate([inf, jnp.abs(s[2:] - 2 * s[1:-1] + s[:-2]), inf])  # per cell; none at the two end cells
    m = n - 4  # nodes 2 .. n - 3 (cells i - 2 .. i + 1)

    def low(a):
        return jnp.minimum(jnp.minimum(a[0:m], a[1:m + 1]), jnp.minimum(a[2:m + 2], a[3:m + 3]))

    edge = jnp.full((2,), -jnp.inf, p.dtype)
    return jnp.concatenate([edge, low(s) - low(d2), edge])


def shock_time_from_hessian(lambda_min) -> Array:
    """t* = 1 / max(0, -lambda_min) (inf when the loss is locally convex, NaN for NaN); THEORY section 3.

    ``lambda_min``: a number or an array of them (elementwise).  Integer and boolean values are read in the default
    float, half-precision ones in float32 (as :func:`shock_time` reads fields); a complex value (a Hessian's
    eigenvalues are real) or one that is not a number is refused with a ``TypeError`` naming ``lambda_min``."""
    try:
        lam = jnp.asarray(lambda_min)
    except (TypeError, ValueError):  # a string, None: JAX's own message named no argument
        lam = None
    if lam is None or jnp.issubdtype(lam.dtype, jnp.complexfloating) or not (
            jnp.issubdtype(lam.dtype, jnp.number) or lam.dtype == jnp.bool_):
        raise TypeError(f"shock_time_from_hessian: lambda_min={lambda_min!r} is not allowed; need a real number or "
                        "an array of them (the Hessian's smallest eigenvalue).")
    # an integer array failed under strict dtype promotion (1.0 / int32), a complex one came out as inf + 0j, and
    # bfloat16 computed 1 / x in bfloat16 (1 / 3 off by 2e-3)
    lam = real_field("shock_time_from_hessian", "lambda_min", lam)
    neg = jnp.maximum(-lam, jnp.zeros_like(lam))
    t = jnp.where(neg > 0, 1.0 / jnp.where(neg > 0, neg, jnp.ones_like(neg)), jnp.inf)
    # NaN in (e.g. a diverged field), NaN out: not inf, which would read as "no compression"
    return jnp.where(jnp.isnan(lam), jnp.full_like(t, jnp.nan), t)


def shock_time(p0: Array, grid: AnyGrid) -> Array:
    """Inviscid shock time ``t* = -1 / min p0'`` of initial data on a grid (``inf`` if p0 is nowhere decreasing).

    1-D: the minimum of the fourth-order derivative is refined by a parabola through its three lowest samples;
    each node's estimate and the refined minimum are kept at or above the lowest slope the samples allow there (the
    smallest cell slope of the stencil less its smallest second difference, which leaves smooth fields as they
    are): beside a kink or a step of p0 the stencil's ringing is not read as compression (an expansion step, no
    shock at all, gave t* = 12 dx / jump; a kink from slope -1 to 0 gave t* = 0.89-0.98 for 1).
    2-D (``p0`` of shape ``(2, nx, ny)``): the smallest eigenvalue of the symmetrised Jacobian of p0, which is
    the Hessian of the loss for a gradient field ``p0 = grad L`` (THEORY section 3), its minimum refined by the
    quadratic through the nine nodes around the lowest one; the diagonal derivatives are kept at or above the slopes
    the samples allow along their axis, as in 1-D (an expansion step is no shock), and so is the refined minimum
    (the quadratic through a flat-bottomed minimum's edge gave t* 1-7% short).  A known (not traced) p0 whose
    curl ``|curl p0| / max|grad p0|`` (the same fourth-order differences) exceeds rounding plus their truncation
    error on the field at some node is refused with a ``ValueError`` naming p0 (``quotient_sgd/hj/_curl.py``); a
    traced one (under ``jit``, e.g. inside :func:`slice_flow`, whose p0 is built by these differences) is not
    checked.  A known p0 whose tangential component jumps across the seam of a periodic axis (more than 4 times its
    largest step inside: ``(y, x)`` from the loss ``x y`` on a periodic grid, read as t* = 0.12 for 1) is refused
    too.
    For Hessian extremes known otherwise (e.g. Lanczos on a network loss) use :func:`shock_time_from_hessian`.
    Integer and boolean fields are read in the default float, half-precision ones in float32 (as the solvers
    do); a complex field or a ``grid`` that is not a :class:`Grid` / :class:`Grid2D` is refused by name.
    """
    p0 = _real_field("shock_time", "p0", p0, grid)
    want = grid.shape if grid.ndim == 1 else (2, *grid.shape)
    if p0.shape != tuple(want):
        raise ValueError(f"shock_time: p0 has shape {p0.shape}; on this grid it must be {tuple(want)}")
    from ._solve import _concrete_non_finite

    if _concrete_non_finite(p0):
        raise ValueError("shock_time: p0 is not finite (a NaN or infinite entry); need a finite initial field.")
    if grid.ndim == 2:
        from ._curl import check_gradient_field
        from ._solve import _check_periodic_tangential

        p0 = check_gradient_field(
            "shock_time", "p0", p0, grid, spectral=False, traced=False,
            advice="The shock time reads the Hessian of the loss as the Jacobian of p0 = grad L (THEORY section 3); "
                   "a rotational field has none.  Pass p0 = grad L, or the Hessian's smallest eigenvalue to "
                   "shock_time_from_hessian.")
        # a tangential jump at a periodic seam is a curl the check above reads as grid-scale content (see there)
        _check_periodic_tangential("shock_time", p0, grid, bounded="")
    if grid.ndim == 1:
        # the fourth-order differences ring beside a kink or a jump of p0 (one lobe of -jump / 12 dx beside an
        # expansion step, an undershoot below the smaller slope at a kink), and so does the parabola through a
        # flat minimum's edge: each node's estimate, and the refined minimum, are kept at or above what the samples
        # allow (_slope_floor)
        floor = _slope_floor(p0, grid)
        d = jnp.maximum(_diff(p0, grid, 0), floor)
        i = jnp.argmin(d)
        n = grid.n
        if grid.periodic:
            j = i
            dm, d0, dp = d[(i - 1) % n], d[i], d[(i + 1) % n]
        else:
            j = jnp.clip(i, 1, n - 2)
            dm, d0, dp = d[j - 1], d[j], d[j + 1]
        curv = dm - 2 * d0 + dp
        ok = curv > 0
        refined = d0 - jnp.where(ok, (dp - dm) ** 2 / (8 * jnp.where(ok, curv, jnp.ones_like(curv))), 0)
        refined = jnp.maximum(refined, floor[j])
        # at an end of a bounded grid the minimum is the end sample itself (no parabola through it)
        lam = jnp.where((i > 0) & (i < n - 1) | grid.periodic, jnp.minimum(refined, d0), d[i])
        return shock_time_from_hessian(lam)
    gx, gy = grid.axes
    # the diagonal derivatives kept at or above the slopes the samples allow along their axis, as in 1-D
    fa = jax.vmap(lambda col: _slope_floor(col, gx), in_axes=1, out_axes=1)(p0[0])
    fb = jax.vmap(lambda row: _slope_floor(row, gy))(p0[1])
    a = jnp.maximum(_diff(p0[0], gx, 0), fa)
    b = jnp.maximum(_diff(p0[1], gy, 1), fb)
    c = 0.5 * (_diff(p0[0], gy, 1) + _diff(p0[1], gx, 0))
    lam = _smallest_eigenvalue(a, b, c)
    return shock_time_from_hessian(_refined_min_2d(lam, grid, ((fa, a), (fb, b), c)))


def _smallest_eigenvalue(a: Array, b: Array, c: Array) -> Array:
    """The smallest eigenvalue of the symmetric matrices ``[[a, c], [c, b]]`` (elementwise); it does not decrease
    when ``a`` or ``b`` grows, nor when ``|c|`` shrinks."""
    return 0.5 * (a + b) - jnp.sqrt(0.25 * (a - b) ** 2 + c * c)


def _refined_min_2d(lam: Array, grid: Grid2D, floors=None) -> Array:
    """The minimum of ``lam`` refined by the quadratic through the nine samples around its smallest one (the 2-D
    counterpart of the 1-D parabola: the node's value alone was off by O(dx^2) for a minimum between nodes, 4.5e-3
    relative on 32 x 34 nodes against 8e-5 in 1-D).  Along a bounded axis whose end holds the smallest sample the
    quadratic is not continued past the end; the refinement is used only where the quadratic has a minimum within a
    cell of that sample, and never raises it.

    ``floors = ((fa, a), (fb, b), c)``: per node, the lowest slopes the samples allow along each axis
    (:func:`_slope_floor`) with the diagonal derivatives, and the off-diagonal derivative.  The refined value is
    kept at or above the smallest eigenvalue of ``[[min fa, max|c|], [max|c|, min fb]]`` over the nine nodes (along
    an axis whose bounded end holds the smallest sample, where the quadratic does not move, ``a`` or ``b`` in place
    of the floor), the lowest the samples allow there (the smallest eigenvalue grows with the diagonal and falls
    with ``|c|``), which is at most the smallest sample: as in 1-D,
    the quadratic through a flat-bottomed minimum's edge is not read as compression (a separable ``p0`` with
    ``dp_x / dx = -1`` on a band, shock time 1, gave 0.93-0.99 on 16-64 nodes a side, where 1-D gave 1)."""
    k = jnp.argmin(lam)
    i, j = k // lam.shape[1], k % lam.shape[1]
    inner, idx = [], []
    for g, m in ((grid.gx, i), (grid.gy, j)):
        inside = jnp.asarray(True) if g.periodic else (m > 0) & (m < g.n - 1)
        inner.append(inside)
        idx.append(((m - 1) % g.n, (m + 1) % g.n) if g.periodic else (jnp.clip(m - 1, 0, g.n - 1),
                                                                       jnp.clip(m + 1, 0, g.n - 1)))
    (im, ip), (jm, jp) = idx
    l0 = lam[i, j]
    zero = jnp.zeros_like(l0)
    gxv = jnp.where(inner[0], 0.5 * (lam[ip, j] - lam[im, j]), zero)
    gyv = jnp.where(inner[1], 0.5 * (lam[i, jp] - lam[i, jm]), zero)
    cxx = jnp.where(inner[0], lam[ip, j] - 2 * l0 + lam[im, j], jnp.ones_like(l0))
    cyy = jnp.where(inner[1], lam[i, jp] - 2 * l0 + lam[i, jm], jnp.ones_like(l0))
    cxy = jnp.where(inner[0] & inner[1], 0.25 * (lam[ip, jp] - lam[ip, jm] - lam[im, jp] + lam[im, jm]), zero)
    det = cxx * cyy - cxy * cxy
    ok = (cxx > 0) & (cyy > 0) & (det > 0)
    safe = jnp.where(ok, det, jnp.ones_like(det))
    ox = -(cyy * gxv - cxy * gyv) / safe  # the quadratic's minimum, in cells from the smallest sample
    oy = -(cxx * gyv - cxy * gxv) / safe
    ok = ok & (jnp.abs(ox) <= 1) & (jnp.abs(oy) <= 1)
    out = jnp.minimum(jnp.where(ok, l0 + 0.5 * (gxv * ox + gyv * oy), l0), l0)
    # a valley flat along one axis (lam independent of y where the x-curvature dominates) has no 2-D minimum: the
    # parabola along each axis alone (on the 2-D quadratic's domain these lie at or above its minimum)
    for gv, cv in ((gxv, cxx), (gyv, cyy)):
        pos = cv > 0
        o = -gv / jnp.where(pos, cv, jnp.ones_like(cv))
        out = jnp.minimum(out, jnp.where(pos & (jnp.abs(o) <= 1), l0 + 0.5 * gv * o, l0))
    if floors is not None:
        (fa, a), (fb, b), c = floors
        rows, cols = jnp.stack([im, i, ip]), jnp.stack([jm, j, jp])

        def near(f):  # the nine nodes around the smallest sample (clipped at a bounded end)
            return f[rows[:, None], cols[None, :]]

        # along an axis whose end holds the smallest sample the quadratic does not move: the samples' own
        # derivatives bound it there (the floors are -inf at and next to a bounded end)
        ma = jnp.min(near(jnp.where(inner[0], fa, a)))
        mb = jnp.min(near(jnp.where(inner[1], fb, b)))
        low = _smallest_eigenvalue(ma, mb, jnp.max(jnp.abs(near(c))))
        # no floor next to a bounded end (-inf there; -inf on both axes made NaN)
        low = jnp.where(jnp.isfinite(ma) & jnp.isfinite(mb), low, jnp.full_like(low, -jnp.inf))
        out = jnp.maximum(out, jnp.minimum(low, l0))
    return out


class Shocks(eqx.Module):
    """Detected shocks, a fixed number of slots (so it jits and vmaps); ``valid`` marks the filled ones.

    Attributes (arrays of length ``max_shocks``, sorted by decreasing steepness):
        location: sub-grid position of the steepest point of the front.
        left, right: states p_left, p_right on either side; ``jump = left - right``.
        steepness: max |dp/dx| across the front.
        speed: Rankine-Hugoniot speed (left + right) / 2.
        admissible: Oleinik entropy condition left > right.
    """

    location: Array
    left: Array
    right: Array
    jump: Array
    steepness: Array
    speed: Array
    admissible: Array
    valid: Array

    def to_list(self) -> list:
        """Host-side list of dicts, one per valid shock; for a batch (``jax.vmap`` of :func:`find_shocks`, leading
        axes before the slots), one such list per member, nested as the batch axes (flat indices into the
        batched arrays picked whole rows: a bare ``TypeError``)."""
        arrs = {k: np.asarray(getattr(self, k)) for k in
                ("location", "left", "right", "jump", "steepness", "speed", "admissible")}
        valid = np.asarray(self.valid)
        if valid.ndim > 1:
            return [Shocks(**{k: a[b] for k, a in arrs.items()}, valid=valid[b]).to_list()
                    for b in range(valid.shape[0])]
        return [{k: (bool(v[i]) if k == "admissible" else float(v[i])) for k, v in arrs.items()}
                for i in np.flatnonzero(valid)]

    @property
    def count(self) -> Array:
        """The number of valid shocks (per member of a batch: the sum over the slots only; over every axis, a
        vmapped result counted the shocks of all members together)."""
        return jnp.sum(self.valid, axis=-1)


def find_shocks(p: Array, grid: Grid, *, max_shocks: int = 8, min_steepness=None, window: int | None = None,
                include_inadmissible: bool = False) -> Shocks:
    """Find the shocks of a 1-D gradient field ``p`` on ``grid`` (THEORY section 3).

    A shock is a local maximum of the compression ``-dp/dx`` (within +-3 cells) above ``min_steepness`` (a
    finite number >= 0, or ``None`` for the default below; a traced one out of range raises through
    ``equinox.error_if`` when the computation runs).
    Default: 10 x the mean slope ``(max p - min p) / length`` (a front of the field's whole spread narrower than a
    tenth of the length), or a front narrower than the grid resolves: a front one cell wide has the stencil's
    steepness ~0.6 jump / dx whatever its true width, below 10 x the mean slope on fewer than ~17 cells or when
    its jump is a small part of the spread (a shock on a steep ramp or on a large smooth wave; a one-cell shock
    of a third of the spread went unreported on 40 cells).  Such a peak counts when the drop ``|p[i-2] - p[i+2]|``
    over the four cells around it is below 3 cells' worth of its steepness (narrower than ~3 cells; a one-cell
    step has 1.7), at least a tenth of the spread, and the steepness exceeds 3 x the median cell slope
    ``|p[i+1] - p[i]| / dx`` (flat on both sides: a smooth field such as a sine, even at 8 points a wavelength, or
    a ramp stays below 2); not at the ends of a bounded grid.  On fewer than 30 cells (where the four cells may
    wrap round a periodic grid) a peak steeper than ``cells / 3`` x the mean slope and 3 x the median cell slope
    counts too.  The criteria are free of the units of x and p.  The steepness is read within the slopes the
    samples allow (as in :func:`shock_time`): the stencil's ringing beside a step is not a front.  Measured on
    Taylor fronts ``-tanh`` of jump 2 with 0.05-3 cells' width: still missed on a background whose own slope
    exceeds about a seventh of the front's jump per cell (a ramp of rise 4 on 12-24 points, a sine of amplitude
    1-2 on 12-40 periodic points).

    Its left/right states are the extreme values of p within a window on each side.  By default
    (``window=None``) each side's window follows the front: 4.5 times the distance (sub-cell, by linear
    interpolation) from the peak to where the steepness has fallen to half its peak value on that side, at most
    ``n // 2`` cells, and ending earlier at the first valley of the steepness past that point (where it rises
    again: the next front).  For Taylor's profile ``-A tanh(A x / (2 nu))`` (steepness ~ sech^2, half maximum at
    0.88 tanh lengths) that is 3.97 tanh lengths, where the profile is within 7e-4 A of its states, however many
    cells the front spans.  A given ``window`` (cells) is used on both sides as it is (it must exceed the front's
    width).  A peak whose jump is below a quarter of its steepness times the cell size (a one-cell step has 1.7)
    is the derivative stencil's ringing beside a step, not a front, and is not reported; nor is one whose jump is
    within the field's rounding, at most ``64 eps max|p|`` (``eps`` of p's dtype): the criteria above are free of
    the units of p, so rounding on a flat field read as fronts (``1.5`` everywhere but one node one ulp higher gave
    a shock of jump 2.2e-16, ``1.5`` plus noise of 1e-15 filled all eight slots).  The error of a solve is above
    rounding and is read as the field's own: on a field flat to within it (p = 1.5 after a shock of jump 1 has left
    a bounded grid, 65-257 points, ``scheme="fv"`` or ``"fv-smooth"``, nu = 1e-3) its wiggles came out as up to six
    fronts of jump 1.5e-7 to 3.2e-6;
    pass ``min_steepness``, or discard fronts whose ``jump`` is within the solve's error (as :func:`slice_flow`
    does).

    On a bounded grid no peak at an end node is a front, whatever the threshold (its other side is not sampled),
    so every reported location lies within ``[lo, hi]`` and a field and its mirror image ``-p(-x)`` give mirrored
    fronts.

    Expansion jumps (p increasing) are inadmissible and are not reported unless ``include_inadmissible``, in
    which case peaks of |dp/dx| are candidates and ``admissible`` tells them apart.

    Integer and boolean fields are read in the default float, half-precision ones in float32; a complex field, a
    2-D grid or a ``grid`` that is not a :class:`Grid` is refused by name.  A field with a NaN or infinite entry
    is refused: a known (not traced) one with a ``ValueError`` naming the
    first bad index, a traced one (under ``jit`` / ``vmap``) when the computation runs, through
    ``equinox.error_if`` (every comparison with NaN is False: it would otherwise report "no shocks").

    Returns:
        :class:`Shocks` with ``max_shocks`` slots.
    """
    p = _real_field("find_shocks", "p", p, grid)
    if grid.ndim != 1:
        raise ValueError(f"find_shocks: grid is 2-D ({grid.shape[0]} x {grid.shape[1]}); it takes a 1-D field on a "
                         "1-D Grid: for 2-D fields take 1-D cuts.")
    if p.shape != grid.shape:
        raise ValueError(f"find_shocks takes a 1-D field of shape {grid.shape}, got {p.shape}.")
    from ._solve import _concrete_non_finite, _concrete_value

    if _concrete_non_finite(p):  # every comparison with NaN is False: it would report "no shocks"
        bad = np.flatnonzero(~np.isfinite(np.asarray(p)))
        raise ValueError(f"find_shocks: p is not finite ({bad.size} NaN or infinite entries, the first at index "
                         f"{int(bad[0])}); a field from a diverged solve has no fronts to locate.")
    if not is_count(max_shocks, 1):  # (None or a complex number failed in a bare int() TypeError)
        raise ValueError(f"find_shocks: max_shocks={max_shocks!r} is not allowed; need an integer >= 1.")
    if window is not None and not is_count(window, 1):
        raise ValueError(f"find_shocks: window={window!r} is not allowed; need an integer >= 1 cells (or None).")
    if not isinstance(include_inadmissible, (bool, np.bool_)):  # a string failed in a bare "unsupported operand"
        raise ValueError(f"find_shocks: include_inadmissible={include_inadmissible!r} is not allowed; need True or "
                         "False.")
    if min_steepness is not None:
        # None when traced (under jit / vmap): used as it is; a string ("1") failed in a bare comparison error and
        # a bool was read as 0 / 1
        m = _concrete_value(min_steepness, None)
        if m is not None and not (m.ndim == 0 and m.dtype.kind in "iuf" and np.isfinite(m) and m >= 0):
            # a NaN threshold made every comparison False: "no shocks" for any field
            raise ValueError(f"find_shocks: min_steepness={min_steepness!r} is not allowed; need a finite number "
                             ">= 0 (a threshold on -dp/dx) or None (the default threshold).")
    max_shocks = int(max_shocks)
    window = None if window is None else int(window)
    # one compiled program (op by op, the first call dispatched ~100 small ops: 6.1 s against ~1 s on 256 points)
    return _find_jit(p, grid, max_shocks, min_steepness, window, include_inadmissible)


def _find(p, grid, max_shocks, min_steepness, window, include_inadmissible) -> Shocks:
    """:func:`find_shocks` after its argument checks."""
    n, dx = grid.n, grid.dx
    p = eqx.error_if(p, ~jnp.all(jnp.isfinite(p)), "find_shocks: p is not finite (NaN or infinite entries); a "
                     "field from a diverged solve has no fronts to locate.")
    if min_steepness is not None:  # a traced one (known ones are checked by find_shocks): NaN reported no shocks
        m = jnp.asarray(min_steepness)
        p = eqx.error_if(p, ~(jnp.isfinite(m) & (m >= 0)), "find_shocks: a traced min_steepness is not a finite "
                         "number >= 0.")
    dp = _diff(p, grid, 0, end_order=2)  # the five-point end stencils ring beside a front at an end
    # within the slopes the samples allow (as shock_time): the stencil's ringing beside a step, a lobe of
    # -jump / (12 dx) beside an expansion step, is not read as a front (on 128 points a sine beside the periodic
    # wrap of a tanh was reported as a second shock of jump 0.1 next to the real one of 1.85)
    dp = jnp.clip(dp, _slope_floor(p, grid), -_slope_floor(-p, grid))
    s = jnp.abs(dp) if include_inadmissible else -dp
    idx = np.arange(n)

    def nb(k):
        j = (idx + k) % n if grid.periodic else np.clip(idx + k, 0, n - 1)
        return j

    if min_steepness is None:
        spread = jnp.max(p) - jnp.min(p)
        peak = s > 10.0 * spread / grid.length
        # a front narrower than the grid shows (a steep viscous shock at small nu on a coarse grid) has the
        # stencil's steepness ~0.6 jump / dx whatever its true width, under 10 x the mean slope when the jump is a
        # small part of the spread (a shock on a steep ramp or on a large smooth wave) or the grid has fewer than
        # ~17 cells: it also counts when the drop over the four cells around it is within 3 cells' worth of its
        # steepness (narrower than ~3 cells; a one-cell step has 1.7), at least a tenth of the spread, and steeper
        # than 3 x the median cell slope |dp| / dx (flat on both sides: a smooth field, a sine even at 8 points a
        # wavelength, stays below 2)
        dcell = (p[nb(1)] - p) if grid.periodic else (p[1:] - p[:-1])
        median_slope = jnp.median(jnp.abs(dcell)) / dx
        drop = jnp.abs(p[nb(-2)] - p[nb(2)])
        narrow = (drop < 3.0 * s * dx) & (drop >= 0.1 * spread) & (s > 3.0 * median_slope)
        cells = round(grid.length / dx)
        if cells < 30:
            # on a few cells the drop over four of them may wrap onto the other side of a periodic grid (5 cells):
            # there a peak also counts when steeper than a third of the spread per cell (cells / 3 x the mean slope)
            narrow = narrow | ((s > cells / 3.0 * spread / grid.length) & (s > 3.0 * median_slope))
        if not grid.periodic:  # a front has two sides: not at the ends of a bounded grid
            narrow = narrow & jnp.asarray((idx > 0) & (idx < n - 1))
        peak = peak | narrow
    else:
        peak = s > min_steepness
    if not grid.periodic:
        # a front has two sides: none at an end node of a bounded grid, whose other side is not sampled.  The
        # comparisons with the clipped neighbours below let a peak at the left end through (s >= itself) and never
        # one at the right end (s > itself), and the parabola through the clipped samples put it half a cell
        # outside the grid: -tanh((x + 1) / 0.2) on 16 points of [-1, 1] gave a front at x = -1.067 with half its
        # jump, its mirror image -tanh((x - 1) / 0.2) none
        peak = peak & jnp.asarray((idx > 0) & (idx < n - 1))
    for k in (1, 2, 3):
        peak = peak & (s >= s[nb(-k)]) & (s > s[nb(k)])
    score = jnp.where(peak, s, -jnp.inf)
    # a grid with fewer points than slots (n = 4 with the default 8) fills the rest with empty slots
    top, i = jax.lax.top_k(score, min(max_shocks, n))
    if max_shocks > n:
        top = jnp.concatenate([top, jnp.full((max_shocks - n,), -jnp.inf, top.dtype)])
        i = jnp.concatenate([i, jnp.zeros((max_shocks - n,), i.dtype)])
    valid = jnp.isfinite(top)
    # sub-grid location: vertex of the parabola through the steepness at i - 1, i, i + 1
    sm, s0, sp = s[nb(-1)][i], s[i], s[nb(1)][i]
    curv = sm - 2 * s0 + sp
    ok = curv < 0
    off = jnp.clip(jnp.where(ok, 0.5 * (sm - sp) / jnp.where(ok, curv, -jnp.ones_like(curv)), 0), -0.5, 0.5)
    loc = grid.x.astype(p.dtype)[i] + off * dx
    if grid.periodic:
        loc = grid.lo + jnp.mod(loc - grid.lo, grid.length)
        # a front just left of lo wraps to lo + length - tiny, which rounds to hi: outside [lo, hi)
        loc = jnp.where(loc >= grid.hi, loc - grid.length, loc)
    reach = max(4, n // 2) if window is None else int(window)
    offs = np.arange(1, reach + 1)

    def gather(f, sign):
        j = i[:, None] + jnp.asarray(sign * offs, i.dtype)[None, :]
        j = j % n if grid.periodic else jnp.clip(j, 0, n - 1)
        return f[j]

    pl, pr = gather(p, -1), gather(p, 1)
    if window is None:
        def side(sv):
            # first offset where the steepness is at most half the peak's, and the crossing between it and the
            # offset before (offset 0: the peak); no crossing within reach: the whole reach
            half = 0.5 * s[i][:, None]
            below = sv <= half
            k = jnp.argmax(below, axis=1)
            prev = jnp.where(k > 0, jnp.take_along_axis(sv, jnp.maximum(k - 1, 0)[:, None], 1)[:, 0], s[i])
            at = jnp.take_along_axis(sv, k[:, None], 1)[:, 0]
            drop = prev - at
            one = jnp.ones_like(drop)
            frac = jnp.where(drop > 0, (prev - half[:, 0]) / jnp.where(drop > 0, drop, one), one)
            kf = k.astype(sv.dtype)
            h = jnp.where(jnp.any(below, axis=1), kf + jnp.clip(frac, 0, 1), jnp.full_like(kf, reach))
            # the valley between this front and the next: the first offset past the half maximum after which the
            # steepness rises again (a flat field, steepness 0, has none)
            rising = jnp.concatenate([sv[:, 1:] > sv[:, :-1], jnp.zeros_like(below[:, :1])], axis=1)
            rising = rising & (jnp.arange(reach)[None, :] >= k[:, None])
            valley = jnp.where(jnp.any(rising, axis=1), jnp.argmax(rising, axis=1) + 1, reach).astype(sv.dtype)
            return jnp.clip(jnp.minimum(jnp.ceil(4.5 * h), valley), 1, reach)

        wl, wr = side(gather(s, -1)), side(gather(s, 1))
        inl = jnp.asarray(offs, wl.dtype)[None, :] <= wl[:, None]
        inr = jnp.asarray(offs, wr.dtype)[None, :] <= wr[:, None]
    else:
        inl = inr = jnp.ones(pl.shape, bool)
    decreasing = dp[i] < 0
    big, small = jnp.asarray(jnp.inf, p.dtype), jnp.asarray(-jnp.inf, p.dtype)
    left = jnp.where(decreasing, jnp.max(jnp.where(inl, pl, small), axis=1), jnp.min(jnp.where(inl, pl, big), axis=1))
    right = jnp.where(decreasing, jnp.min(jnp.where(inr, pr, big), axis=1), jnp.max(jnp.where(inr, pr, small), axis=1))
    admissible = left > right
    # a front drops by at least what its steepness gives over a fraction of a cell (a one-cell step: 1.7 x); a peak
    # with (almost) no jump is the fourth-order stencil's ringing beside a step, not a front
    real = jnp.abs(left - right) > 0.25 * jnp.abs(dp[i]) * dx
    # the criteria are free of the units of p: rounding on a flat field (1.5 with one node an ulp higher) looked
    # like a front of jump 2.2e-16; a jump within the field's rounding is none
    real = real & (jnp.abs(left - right) > 64 * jnp.finfo(p.dtype).eps * jnp.max(jnp.abs(p)))
    valid = valid & real & (admissible | include_inadmissible)
    return Shocks(location=loc, left=left, right=right, jump=left - right, steepness=jnp.abs(dp[i]),
                  speed=0.5 * (left + right), admissible=admissible, valid=valid)


_find_jit = eqx.filter_jit(_find)
