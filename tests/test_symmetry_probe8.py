"""Probe of the symmetry groups and models: the quotient distance where an orbit's nearest point lies in its
closure only, and the group laws and projections of model families beyond the shipped cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.symmetry import Scale, align, quotient_distance


@pytest.mark.parametrize("dtype, tilt", [("float64", 0.0085), ("float64", 0.009), ("float32", 0.006)])
def test_quotient_distance_gradient_where_the_nearest_point_is_in_the_orbit_closure(x64, dtype, tilt):
    """A per-channel scale whose channel points slightly away from the other network's (cosine ``-tilt``) is nearest
    it as its factor goes to 0, a point of the orbit's closure only.  The Gauss-Newton fit of the gauge shrank the
    channel by ``e`` a step until the log-factor jumped (-176, then -2e21): ``exp`` flushed the channel to exactly 0
    while the derivative of the step's coefficient ``<w, t> / |w|^2`` overflowed, and ``jax.grad`` of
    ``quotient_distance`` and of ``align`` was NaN (0 times infinity) for these tilts (the first layer of a
    BatchNorm CNN classifier, measured the same way).  The value was right; now the gradient is finite, and in
    float64 equals a central finite difference."""
    dt = jnp.dtype(dtype)
    group = Scale(members=(("w", 1),))
    a = {"w": jnp.asarray([[-tilt, 1.0], [1.0, 0.5]], dt)}
    b = {"w": jnp.asarray([[1.0, 2.0], [0.0, 0.3]], dt)}
    grads = [jax.grad(lambda p: quotient_distance(group, p, b))(a)["w"],
             jax.grad(lambda p: quotient_distance(group, a, p))(b)["w"],
             jax.grad(lambda p: jnp.sum(align(group, a, p)["w"]))(b)["w"]]
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads), grads
    if dt == jnp.float64:
        u = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2)), dt)
        h = 1e-6
        for fn, at, g in ((lambda p: quotient_distance(group, {"w": p}, b), a["w"], grads[0]),
                          (lambda p: quotient_distance(group, a, {"w": p}), b["w"], grads[1])):
            fd = (fn(at + h * u) - fn(at - h * u)) / (2 * h)
            assert abs(float(jnp.sum(g * u)) - float(fd)) <= 1e-6 * abs(float(fd))
