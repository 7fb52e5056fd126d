"""Per-step observables on cases the other tests do not use."""

import jax.numpy as jnp
import numpy as np

from quotient_sgd import observables as qobs
from quotient_sgd.symmetry import Product, Scale


def _exact_rms_angle(w, d, unit_axis):
    """RMS over the units (along ``unit_axis``) of the angle between ``w`` and ``w + d``, in float64 NumPy, from the
    component of ``w + d`` across ``w`` (an orthogonal residual, no cancellation)."""
    w, d = np.moveaxis(np.asarray(w, np.float64), unit_axis, -1), np.moveaxis(np.asarray(d, np.float64), unit_axis, -1)
    w, d = w.reshape(-1, w.shape[-1]), d.reshape(-1, d.shape[-1])
    w1 = w + d
    along = (w1 * w).sum(0) / (w * w).sum(0)
    across = np.linalg.norm(w1 - along * w, axis=0)
    ang = np.arctan2(across, along * np.linalg.norm(w, axis=0))
    return np.sqrt(np.mean(ang ** 2))


def test_angular_update_of_a_step_mostly_along_the_weights():
    """A weight decay step -0.1 w with a gradient part 1e-6 |w| across it (per-channel units of a conv kernel, axis
    3, and a whole-block unit beside it): float32 angle of each unit is about 1e-6.  Computed as
    ``sqrt(|Delta|^2 - <w, Delta>^2 / |w|^2)`` the across part cancelled to sqrt(eps) |Delta|: an RMS angle of
    2.7e-5, 24 times the exact 1.1e-6."""
    rng = np.random.default_rng(0)
    group = Product([Scale(members=((("k",), 3),), name="per_channel"),
                     Scale(members=((("a",), None), (("b",), None)), name="block")])
    w = {"k": rng.normal(size=(3, 3, 4, 6)), "a": rng.normal(size=(5, 4)), "b": rng.normal(size=(4,))}

    def across(x, axes):  # a random direction orthogonal to x per unit (summing over `axes`)
        r = rng.normal(size=x.shape)
        return r - (r * x).sum(axes, keepdims=True) / (x * x).sum(axes, keepdims=True) * x

    rk = across(w["k"], (0, 1, 2))
    ab = np.concatenate([w["a"].ravel(), w["b"]])
    rab = across(ab, 0)
    d = {"k": -0.1 * w["k"] + 1e-6 * rk,
         "a": -0.1 * w["a"] + 1e-6 * rab[:20].reshape(5, 4), "b": -0.1 * w["b"] + 1e-6 * rab[20:]}
    got = qobs.angular_update(group, jax_tree(w, jnp.float32), jax_tree(d, jnp.float32))
    want_k = _exact_rms_angle(w["k"], d["k"], 3)
    want_b = _exact_rms_angle(ab[:, None], np.concatenate([d["a"].ravel(), d["b"]])[:, None], 1)
    assert 5e-7 < want_k < 5e-6 and 5e-7 < want_b < 5e-6
    np.testing.assert_allclose(float(got["per_channel"]), want_k, rtol=2e-2)
    np.testing.assert_allclose(float(got["block"]), want_b, rtol=2e-2)


def jax_tree(tree, dtype):
    return {k: jnp.asarray(v, dtype) for k, v in tree.items()}
