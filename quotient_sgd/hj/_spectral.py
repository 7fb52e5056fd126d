"""Fourier pseudo-spectral right-hand sides with 2/3 dealiasing (THEORY section 3).

Gradient form (viscous Burgers, p = grad u):   p_t = -grad(|p|^2 / 2) + nu Lap p
Value form (viscous Hamilton-Jacobi):          u_t = -|grad u|^2 / 2  + nu Lap u

In 2-D the Burgers nonlinearity is written as grad(|p|^2/2), which equals (p . grad) p exactly when p is a
gradient field (the only case THEORY section 3 needs: p = grad u stays curl-free); this conservative form is
the one that captures shocks correctly.  :func:`solve_burgers` refuses a 2-D initial field whose curl exceeds
rounding (``_curl``).  The mean of u is *not* held fixed: the k = 0 mode of the HJ
nonlinearity, -mean(|grad u|^2)/2, lowers the level of the value function as it should (Cole-Hopf).

Dealiasing (Orszag's 2/3 rule): the quadratic products are formed from the modes |m| < n/3 of each axis, and
only the modes |m| < n/3 of the product are kept, so no aliased mode of the product reaches a kept mode: a
product of kept modes has |m| <= 2K and aliases to |m| >= n - 2K, which is not kept exactly when 3K < n.  (The
bound is strict: with n divisible by 3, keeping K = n/3 would alias the product mode 2K onto the kept mode -K.)  Modes
above the cut in the state are not fed to the nonlinearity and decay under the exact viscous factor.

The split ``y_t = L y + N(y)`` with L = -nu |k|^2 diagonal in Fourier space is what the exponential
integrator (:class:`quotient_sgd.hj.ETDRK4`) uses; ``rhs`` is the sum, for plain explicit or IMEX stepping.
Reference: Basdevant et al., Computers & Fluids 14 (1986), for the Fourier method on Burgers.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._custom_types import Array
from ._grid import AnyGrid, Grid


def _axes(grid: AnyGrid) -> tuple[int, ...]:
    return (-1,) if grid.ndim == 1 else (-2, -1)


def _wavevectors(grid: AnyGrid) -> list[Array]:
    """One array per axis, broadcastable to the rfftn output shape."""
    if grid.ndim == 1:
        return [grid.wavenumbers(real=True)]
    kx = grid.gx.wavenumbers(real=False)[:, None]
    ky = grid.gy.wavenumbers(real=True)[None, :]
    return [kx, ky]


def _ik(k: Array, like: Array) -> Array:
    """i k as a complex array of ``like``'s dtype (explicit: strict dtype promotion)."""
    return k.astype(like.dtype) * 1j


class Spectral(eqx.Module):
    """Fourier pseudo-spectral scheme on a periodic grid (smooth, viscous regime).

    Resolves a viscous shock when its width ~ 4 nu / jump spans a few grid points; below that it rings (Gibbs)
    and eventually blows up: use :class:`FiniteVolume` for near-inviscid flows.

    Attributes:
        dealias: fraction of the modes of each axis kept in products, in (0, 1] (2/3: Orszag's rule); 0 or less
            dropped the nonlinearity silently (a heat equation) and is refused.
    """

    dealias: float = eqx.field(static=True, default=2.0 / 3.0)

    def __check_init__(self):
        d = self.dealias
        if isinstance(d, bool) or not (isinstance(d, (int, float, np.floating)) and np.isfinite(d) and 0 < d <= 1):
            raise ValueError(f"Spectral(dealias={d!r}) is not allowed; need a number in (0, 1] (the fraction of "
                             "each axis's modes kept in products; 2/3 is Orszag's rule, 1 keeps all).")

    # -- transforms ---------------------------------------------------------------------------------------
    def forward(self, grid: AnyGrid, y: Array) -> Array:
        return jnp.fft.rfftn(y, axes=_axes(grid))

    def inverse(self, grid: AnyGrid, yhat: Array) -> Array:
        return jnp.fft.irfftn(yhat, s=grid.shape, axes=_axes(grid))

    def _mask(self, grid: AnyGrid) -> Array:
        return jnp.asarray(self._mask_np(grid))

    def _mask_np(self, grid: AnyGrid) -> np.ndarray:
        """The kept modes (rfftn shape) as a NumPy array: a constant also while tracing."""
        grids = (grid,) if isinstance(grid, Grid) else grid.axes
        masks = []
        for i, g in enumerate(grids):
            m = g.index_frequencies(real=(i == len(grids) - 1))
            # strictly below the cut (see the module docstring); the slack absorbs the rounding of dealias * n
            masks.append(2 * np.abs(m) < self.dealias * g.n - 1e-9)
        return masks[0] if len(masks) == 1 else masks[0][:, None] & masks[1][None, :]

    def linear_symbol(self, grid: AnyGrid, nu) -> Array:
        """Diagonal of L = nu Lap in Fourier space, ``-nu |k|^2`` (shape of the rfftn output)."""
        k2 = sum(k * k for k in _wavevectors(grid))
        return -nu * k2.astype(jnp.result_type(nu))  # the field's precision, not the grid's default float

    def nonlinear_hat(self, grid: AnyGrid, form: str, yhat: Array) -> Array:
        """Fourier transform of the dealiased nonlinear term N(y)."""
        mask = self._mask(grid)
        ks = _wavevectors(grid)
        yhat = jnp.where(jnp.broadcast_to(mask, yhat.shape), yhat, jnp.zeros_like(yhat))
        if form == "burgers":
            p = self.inverse(grid, yhat)
            energy = 0.5 * jnp.sum(p * p, axis=0) if grid.ndim == 2 else 0.5 * p * p
            ehat = jnp.where(mask, self.forward(grid, energy), 0)
            grads = [_ik(k, ehat) * ehat for k in ks]
            out = grads[0] if grid.ndim == 1 else jnp.stack(grads)
            return -out
        if form == "hj":
            sq = 0
            for k in ks:
                g = self.inverse(grid, _ik(k, yhat) * yhat)
                sq = sq + g * g
            return -0.5 * jnp.where(mask, self.forward(grid, sq), 0)
        raise ValueError(f"form must be 'burgers' or 'hj', got {form!r}.")

    def rhs(self, grid: AnyGrid, form: str, y: Array, nu) -> Array:
        """Full right-hand side ``L y + N(y)`` in physical space."""
        yhat = self.forward(grid, y)
        lin = self.linear_symbol(grid, nu)
        if form == "burgers" and grid.ndim == 2:
            lin = lin[None]
        return self.inverse(grid, lin.astype(yhat.dtype) * yhat + self.nonlinear_hat(grid, form, yhat))

    def diffusion(self, grid: AnyGrid, form: str, y: Array, nu) -> Array:
        """The stiff linear part ``nu Lap y`` alone (the implicit term of an IMEX split)."""
        lin = self.linear_symbol(grid, nu)
        if form == "burgers" and grid.ndim == 2:
            lin = lin[None]
        yhat = self.forward(grid, y)
        return self.inverse(grid, lin.astype(yhat.dtype) * yhat)

    def spectral_tail(self, grid: AnyGrid, form: str, ys: Array) -> Array:
        """Resolution check of saved fields ``ys`` (leading axis = save time): per field, the largest Fourier
        amplitude of the gradient (``p`` itself for ``form="burgers"``, ``grad u`` for ``"hj"``) in the top band
        of the kept modes (``|m| >= 0.8`` of the dealiasing cut on some axis, and the highest kept mode when that
        band is empty: at the default 2/3 on n <= 9 and n = 12 points), relative to its largest amplitude over all
        kept modes.

        A resolved solution's spectrum decays exponentially, so the ratio is tiny (below 1e-5 on THEORY's
        reference problem once the viscous length ``nu / max|p|`` spans 1.5 grid spacings); an under-resolved
        shock rings (Gibbs) with an error a few times this ratio (measured on the reference problem at
        ``t1 = 0.5``: ratio 1e-2 at n = 256 with L-infinity error 4e-2 against Cole-Hopf, 7e-4 / 4e-3 at n = 512,
        9e-6 / 2e-5 at n = 1024).  A constant field gives 0, and so does a top band at the field's rounding level
        (below ``eps`` times its largest Fourier amplitude, the mean included, times the largest ``|k|``)."""
        mask = self._mask_np(grid)
        grids = (grid,) if isinstance(grid, Grid) else grid.axes
        band = np.zeros(mask.shape, bool)
        for i, g in enumerate(grids):
            m = np.abs(g.index_frequencies(real=(i == len(grids) - 1)))
            kept = m[2 * m < self.dealias * g.n - 1e-9]  # as in _mask_np
            # at least the highest kept mode: on small grids (n <= 9, n = 12 at 2/3) 0.8 of the cut lies above it
            top = m >= min(0.8 * self.dealias * g.n / 2, kept.max())
            band |= top if grid.ndim == 1 else (top[:, None] if i == 0 else top[None, :])
        band &= mask
        yhat = jnp.fft.rfftn(ys, axes=_axes(grid))
        raw = jnp.abs(yhat)
        if form == "hj":
            kabs = jnp.sqrt(sum(k * k for k in _wavevectors(grid))).astype(ys.dtype)
            amp = raw * kabs[None]
            kscale = jnp.max(jnp.where(mask, kabs, 0))
        else:
            if grid.ndim == 2:  # (times, 2, nx, ny): the larger component
                raw = jnp.max(raw, axis=1)
            amp = raw
            kscale = jnp.ones((), ys.dtype)
        axes = tuple(range(1, amp.ndim))
        peak = jnp.max(jnp.where(mask[None], amp, 0), axis=axes)
        high = jnp.max(jnp.where(band[None], amp, 0), axis=axes) if band.any() else jnp.zeros_like(peak)
        # rounding: a top-band amplitude below eps x the field's largest Fourier amplitude (its mean included) x
        # the largest |k| is the field's rounding error, not a resolved structure (an HJ field relaxing to a
        # constant has a gradient far below the rounding of its mean)
        floor = jnp.finfo(ys.dtype).eps * jnp.max(jnp.where(mask[None], raw, 0), axis=axes) * kscale
        high = jnp.where(high > floor, high, 0)
        return jnp.where(peak > 0, high / jnp.where(peak > 0, peak, 1), 0).astype(ys.dtype)

    def derivative(self, grid: AnyGrid, u: Array) -> Array:
        """Spectral gradient of a scalar field (shape ``(n,)`` in 1-D, ``(2, nx, ny)`` in 2-D).

        The Nyquist mode of an axis with an even number of points, ``cos(pi x / dx)``, has the derivative 0 at the
        nodes (the mode ``sin(pi x / dx)`` vanishes there): its term is dropped from the derivative along that axis.
        ``irfft`` drops it along the last axis by itself (it reads only the real part of that bin); along the first
        axis of a 2-D grid, a full FFT, it was kept with the wavenumber ``-pi / dx`` and broke the Hermitian
        symmetry of the transform: ``d/dx`` of ``cos(4 x) cos(y)`` on 8 x 6 nodes of ``[0, 2 pi)^2`` came out
        3.46 at some node where it is 0 at every one."""
        uhat = self.forward(grid, u)
        gs = [self.inverse(grid, _ik(k, uhat) * uhat) for k in _derivative_wavevectors(grid)]
        return gs[0] if grid.ndim == 1 else jnp.stack(gs)


def _derivative_wavevectors(grid: AnyGrid) -> list[Array]:
    """:func:`_wavevectors` with the Nyquist wavenumber of each even axis set to 0 (see :meth:`Spectral.derivative`)."""
    grids = (grid,) if isinstance(grid, Grid) else grid.axes
    out = []
    for i, (k, g) in enumerate(zip(_wavevectors(grid), grids)):
        m = g.index_frequencies(real=(i == len(grids) - 1))
        nyquist = (g.n % 2 == 0) & (np.abs(m) == g.n // 2)
        out.append(jnp.where(jnp.asarray(nyquist.reshape(k.shape)), jnp.zeros_like(k), k))
    return out
