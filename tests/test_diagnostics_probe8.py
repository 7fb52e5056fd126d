"""Diagnostics: numeric arguments given as NumPy or JAX scalars (0-d arrays) read as the numbers they hold."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.diagnostics import (
    LiveDetector,
    adam_edge,
    cusum,
    cusum_threshold,
    detect,
    fold_edge,
    fold_levels_for,
    stability_edge,
)

# exactly representable in float32, so that a JAX scalar (float32 without x64) holds the same number
_SCALARS = [jnp.float32, np.array, jnp.asarray]


@pytest.mark.parametrize("as_scalar", _SCALARS, ids=["jnp.float32", "np.array", "jnp.asarray"])
def test_edges_take_zero_dimensional_arrays_and_keep_their_closed_forms(as_scalar):
    """``adam_edge`` refused a JAX or NumPy 0-d ``b1`` or ``decay`` and ``stability_edge`` / ``fold_edge`` a 0-d
    ``decay``, while ``momentum`` was taken in that form.  Each now reads the number: the closed forms
    ``2 (1 + b) / (1 - b)`` (Adam, ``(2 - d) (1 + b) / (1 - b)`` with decay), ``2 (1 + beta) - d`` (heavy ball)
    and ``1 + beta - d`` (its fold) hold at ``b = beta = 0.5``, ``d = 0.25``."""
    b, d = as_scalar(0.5), as_scalar(0.25)
    assert adam_edge(b) == 2 * 1.5 / 0.5
    assert adam_edge(0.5, decay=d) == (2 - 0.25) * 1.5 / 0.5
    assert stability_edge(0.5, decay=d) == 2 * 1.5 - 0.25
    assert fold_edge(b, decay=d) == 1.5 - 0.25
    assert fold_levels_for(jnp.array([1.0, 2.0]), b) == [1.5, 3.0]
    for bad in (as_scalar(1.0), as_scalar(-0.25)):
        with pytest.raises(ValueError, match=r"adam_edge: b1=.* is not allowed; need a number in \[0, 1\)"):
            adam_edge(bad)
    with pytest.raises(ValueError, match=r"stability_edge: decay=.* is not allowed; need a number in \[0, 3.0\)"):
        stability_edge(0.5, decay=as_scalar(3.0))


def test_cusum_takes_zero_dimensional_arrays():
    """``cusum(x, alpha=jnp.float32(...))`` and ``cusum_threshold(jnp.int32(60))`` failed with a bare
    ``TypeError: unhashable type`` (the threshold's cache), and a JAX or NumPy 0-d ``k``, ``min_ref``,
    ``n_blocks`` or ``threshold`` was refused as not a number.  They give what the Python numbers give; arrays
    with an axis and non-integral counts are still refused, naming the argument."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(80)
    x[40:] += 2.0  # a mean shift of two standard deviations: alarmed near index 40
    want = cusum(x, alpha=0.25, k=0.5, min_ref=10, n_blocks=100)
    assert want and 38 <= want[0].index <= 50
    got = cusum(x, alpha=jnp.float32(0.25), k=jnp.float32(0.5), min_ref=np.array(10), n_blocks=jnp.int32(100))
    assert got == want
    assert cusum(x, threshold=jnp.float32(4.0)) == cusum(x, threshold=4.0)
    assert cusum_threshold(jnp.int32(60), jnp.float32(0.25)) == cusum_threshold(60, 0.25)
    assert cusum_threshold(np.array(60), seed=np.array(1)) == cusum_threshold(60, seed=1)
    with pytest.raises(ValueError, match=r"cusum: alpha=.* is not allowed; need a number in \(0, 1\)"):
        cusum(x, alpha=jnp.array([0.05]))
    with pytest.raises(ValueError, match=r"cusum: min_ref=.* is not allowed; need an integer >= 2"):
        cusum(x, min_ref=jnp.float32(10.5))
    with pytest.raises(ValueError, match=r"cusum_threshold: seed=\[1\] is not allowed"):
        cusum_threshold(60, seed=[1])


def _eos_trajectory(n=60):
    s = np.linspace(5.0, 25.0, n)  # lr * s crosses 1 at s = 10 and 2 at s = 20 (lr = 0.1)
    return {"loss": np.exp(-np.linspace(0, 2, n)), "sharpness_quotient": s,
            "fold_number": 0.1 * s}


def test_levels_and_start_step_take_jax_arrays():
    """A JAX array of ``eos_levels`` / ``fold_levels`` was refused where the NumPy array was taken, and a 0-d
    integer ``start_step`` (``detect``, ``LiveDetector``) was refused as not an integer.  They give the events of
    the Python values: each level crossed where ``lr * s`` first reaches it, at steps shifted by ``start_step``."""
    traj = _eos_trajectory()
    s = traj["sharpness_quotient"]
    kinds = ["edge_of_stability", "fold"]
    want = detect(traj, lr=0.1, kinds=kinds, eos_levels=(1.0, 2.0), fold_levels=(1.0, 2.0), start_step=7)
    steps = {(e.kind, e.details["level"]) for e in want}
    assert {("edge_of_stability", 1.0), ("edge_of_stability", 2.0), ("fold", 1.0), ("fold", 2.0)} <= steps
    for e in want:
        assert e.step == 7 + int(np.argmax(0.1 * s >= e.details["level"]))
    got = detect(traj, lr=0.1, kinds=kinds, eos_levels=jnp.array([1.0, 2.0]),
                 fold_levels=(jnp.float32(1.0), np.float32(2.0)), start_step=jnp.int32(7))
    assert got == want
    live = LiveDetector(lr=0.1, kinds=kinds, start_step=jnp.int32(7))
    live.update({k: v[:30] for k, v in traj.items()})
    live.update({k: v[30:] for k, v in traj.items()})
    assert live.events == want and type(live.start_step) is int
    with pytest.raises(ValueError, match=r"detect: eos_levels=.* is not allowed; need a non-empty sequence"):
        detect(traj, lr=0.1, kinds=kinds, eos_levels=jnp.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"detect: start_step=.* is not allowed; need an integer"):
        detect(traj, lr=0.1, kinds=kinds, start_step=jnp.float32(7.0))
