"""Exponential time differencing as a Diffrax solver, for the stiff viscous term (THEORY section 3).

The semi-discrete HJ / Burgers systems are ``y' = L y + N(y)`` with L = nu Lap diagonal in Fourier space and
N the (non-stiff) nonlinearity.  Plain explicit stepping is limited by ``h nu |k|_max^2 = O(1)``; exponential
integrators treat L exactly.  :class:`ETDRK4` is the fourth-order scheme of Cox & Matthews (J. Comput. Phys.
176, 2002) with the phi-function evaluation of Kassam & Trefethen (SIAM J. Sci. Comput. 26, 2005) replaced by
Taylor series near 0; it is embedded with the stiffly second-order two-stage exponential Runge-Kutta method of
Hochbruck & Ostermann (Acta Numerica 19, 2010) that reuses its first two stages, which gives a local error
estimate for Diffrax's adaptive step-size controllers at no extra right-hand-side cost.

Why not an integrating factor on the whole interval?  ``v = exp(-L t) y`` makes the ODE non-stiff but grows
like ``exp(nu k^2 t)``: at N = 2048 on the reference problem that overflows float64.  Restarting the factor at
every step is exactly what an exponential Runge-Kutta method does.

The solver is an ordinary ``diffrax.AbstractAdaptiveSolver`` on the term :class:`SemilinearTerm`, so
``SaveAt``, step-size controllers, ``RecursiveCheckpointAdjoint`` and ``vmap`` work unchanged.  Its dense output
is linear between steps; :func:`solve_burgers` therefore makes the controller step onto every save time.
"""

from __future__ import annotations

import math
from typing import ClassVar

import diffrax as dfx
import equinox as eqx
import jax.numpy as jnp

from ._custom_types import Array
from ._grid import AnyGrid

_TAYLOR_TERMS = 18


def _phi(j: int, z: Array) -> Array:
    """phi_j(z) = sum_k z^k / (k + j)!, for real z; Taylor series for |z| < 1, closed form elsewhere."""
    small = jnp.abs(z) < 1.0
    zs = jnp.where(small, z, jnp.zeros_like(z))
    series = jnp.zeros_like(z)
    for k in reversed(range(_TAYLOR_TERMS)):
        series = series * zs + 1.0 / math.factorial(k + j)
    zl = jnp.where(small, jnp.ones_like(z), z)
    closed = jnp.exp(zl)
    for k in range(j):
        closed = closed - zl**k / math.factorial(k)
    closed = closed / zl**j
    return jnp.where(small, series, closed)


class SemilinearTerm(dfx.AbstractTerm):
    """``dy/dt = L y + N(y)`` for a field on a grid, with ``L`` diagonal in the scheme's transform space.

    ``args`` is the viscosity nu.  ``vf`` returns the full right-hand side in physical space, so the term also
    works with any ordinary Diffrax solver (e.g. ``diffrax.Tsit5``); :class:`ETDRK4` uses the split.
    """

    scheme: eqx.Module
    grid: AnyGrid
    form: str = eqx.field(static=True)

    def vf(self, t, y, args):
        return self.scheme.rhs(self.grid, self.form, y, args)

    def contr(self, t0, t1, **kwargs):
        return t1 - t0

    def prod(self, vf, control):
        return vf * control

    # -- the split ------------------------------------------------------------------------------------------
    def forward(self, y):
        return self.scheme.forward(self.grid, y)

    def inverse(self, yhat):
        return self.scheme.inverse(self.grid, yhat)

    def linear(self, args):
        lin = self.scheme.linear_symbol(self.grid, args)
        if self.form == "burgers" and self.grid.ndim == 2:
            lin = lin[None]
        return lin

    def nonlinear(self, yhat, args):
        del args
        return self.scheme.nonlinear_hat(self.grid, self.form, yhat)


class ETDRK4(dfx.AbstractAdaptiveSolver):
    """Cox-Matthews ETDRK4 with an embedded stiffly-second-order estimate, for :class:`SemilinearTerm`.

    Order 4 (error-estimate order 3).  Four nonlinear evaluations per step.  Use with
    ``diffrax.PIDController``; linear interpolation between steps for dense output.
    """

    term_structure: ClassVar = SemilinearTerm
    interpolation_cls: ClassVar = dfx.LocalLinearInterpolation

    def order(self, terms):
        return 4

    def error_order(self, terms):
        return 3

    def init(self, terms, t0, t1, y0, args):
        return None

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del solver_state, made_jump
        while not isinstance(terms, SemilinearTerm):  # diffrax wraps terms (direction of integration)
            terms = terms.term
        h = t1 - t0
        z = h * terms.linear(args)
        e, e2 = jnp.exp(z), jnp.exp(0.5 * z)
        q = 0.5 * h * _phi(1, 0.5 * z)
        p1, p2, p3 = _phi(1, z), _phi(2, z), _phi(3, z)
        yh = terms.forward(y0)
        cdt = yh.dtype  # strict promotion: the real coefficients multiply complex spectra
        e, e2, q, p1, p2, p3 = (jnp.asarray(v).astype(cdt) for v in (e, e2, q, p1, p2, p3))
        h = jnp.asarray(h).astype(cdt)
        nu_ = terms.nonlinear(yh, args)
        a = e2 * yh + q * nu_
        na = terms.nonlinear(a, args)
        b = e2 * yh + q * na
        nb = terms.nonlinear(b, args)
        c = e2 * a + q * (2 * nb - nu_)
        nc = terms.nonlinear(c, args)
        eyh = e * yh
        y1h = eyh + h * ((p1 - 3 * p2 + 4 * p3) * nu_ + (2 * p2 - 4 * p3) * (na + nb) + (4 * p3 - p2) * nc)
        low = eyh + h * ((p1 - 2 * p2) * nu_ + 2 * p2 * na)
        y1 = terms.inverse(y1h).astype(y0.dtype)
        err = terms.inverse(y1h - low).astype(y0.dtype)
        return y1, err, dict(y0=y0, y1=y1), None, dfx.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)
