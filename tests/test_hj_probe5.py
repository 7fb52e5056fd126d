"""HJ / Burgers engine: edge cases found by probing against exact references (THEORY section 3)."""

import warnings

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.hj import Grid, solve_burgers


def _under_resolved_t1_derivative(mode):
    # An under-resolved spectral solve (reference problem past t* = 1/pi on 32 points) differentiated with respect
    # to t1 only: nu is known, so the resolution check runs, and the save time it names is traced.  It raised a
    # ConcretizationTypeError instead of warning.
    g = Grid(32, -1.0, 1.0)
    p0 = -jnp.sin(jnp.pi * g.x)
    w = jnp.sin(g.x + 0.3)  # an odd part: p is odd
    adjoint = dfx.ForwardMode() if mode == "jvp" else dfx.RecursiveCheckpointAdjoint()

    def obs(t1):
        return jnp.sum(w * solve_burgers(p0, g, nu=0.01, t1=t1, dt=0.05, adjoint=adjoint).ps[-1])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = jax.jvp(obs, (0.42,), (1.0,))[1] if mode == "jvp" else jax.grad(obs)(0.42)
    msgs = [str(c.message) for c in caught if "under-resolved on the 32 grid" in str(c.message)]
    assert len(msgs) == 1 and "at t=0.42 " in msgs[0], msgs
    assert np.isfinite(float(d)) and float(d) != 0.0


def test_under_resolved_warning_under_jvp_with_respect_to_t1_alone(x64):
    _under_resolved_t1_derivative("jvp")


@pytest.mark.slow
def test_under_resolved_warning_under_grad_with_respect_to_t1_alone(x64):
    _under_resolved_t1_derivative("grad")
