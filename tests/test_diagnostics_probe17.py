"""Diagnostics on cases beyond their other tests: the step numbers given to the public per-kind detectors."""

import numpy as np
import pytest

from quotient_sgd import diagnostics as D

_PUBLIC = {"divergence": D.detect_divergence, "shock": D.detect_shock, "fold": D.detect_fold,
           "edge_of_stability": D.detect_edge_of_stability, "loss_spike": D.detect_loss_spike,
           "catapult": D.detect_catapult, "transition": D.detect_transition}


def _trajectory(n=102):
    loss = np.r_[np.linspace(1.0, 0.5, 50), [2.0, 3.0], np.linspace(0.4, 0.1, n - 52)]
    return {"loss": loss, "fold_number": np.linspace(0.0, 3.0, n), "shock_number": np.linspace(1.5, 0.0, n),
            "sharpness_horizontal": np.linspace(1.0, 30.0, n)}


def test_public_detectors_refuse_steps_that_do_not_number_the_rows():
    """The public ``detect_*`` functions cast ``steps`` to int64 as they came: steps of another length than the
    trajectory failed in a bare ``IndexError`` / broadcast error or were read as they were (200 steps for 102 rows:
    events), reversed steps put the events at the wrong steps (``detect_fold``: a fold at step 67 listed before
    one at step 33), and fractional steps were truncated (``0.5 * arange(n)``: every step twice).  Each is now a
    ``ValueError`` naming the function and ``steps``.  Steps that number the rows give the events :func:`detect`
    finds with those steps as the trajectory's ``step`` key."""
    traj = _trajectory()
    n = len(traj["loss"])
    good = 10 + 3 * np.arange(n)
    bad = {"shorter": good[:50], "longer": 10 + 3 * np.arange(2 * n), "reversed": good[::-1].copy(),
           "repeated": np.repeat(good[: n // 2], 2), "fractional": 0.5 * np.arange(n), "nan": np.r_[good[:-1], np.nan],
           "two columns": np.stack([good, good], axis=1)}
    for kind, fn in _PUBLIC.items():
        for what, steps in bad.items():
            with pytest.raises(ValueError, match=f"^detect_{kind}: steps.* is not allowed; need one integer step"):
                fn(traj, steps=steps, lr=0.1)
        got = fn(traj, steps=good.astype(np.float64), lr=0.1)  # whole numbers as floats are step numbers
        want = D.detect({**traj, "step": good}, lr=0.1, kinds=[kind])
        assert [(e.step, e.kind, e.variant, e.strength) for e in sorted(got, key=lambda e: (e.step, e.variant))] \
            == [(e.step, e.kind, e.variant, e.strength) for e in want]
    # the two crossings of the per-step fold number are at the steps of their rows, in order
    folds = [e.step for e in D.detect_fold(traj, steps=good, lr=0.1)]
    assert folds == sorted(folds) and len(folds) == 2
    assert set(folds) <= set(good.tolist())
