"""The runner in symmetry modes ``horizontal`` and ``gauge_fix``: what the recorded step observables describe.

Under ``gauge_fix`` the optimiser steps from the canonical representative ``c(theta)`` with the gradient
transported there; the recorded update ``c(theta) + Delta - theta`` also contains the re-gauging jump (a unit
permutation, a rescale), which is a change of coordinates, not a step.  The step observables (update norms,
effective learning rate, curvature, shock / fold numbers) describe ``Delta``, the step of the fixed dynamics."""

import numpy as np

from helpers import tiny_settings
from quotient_sgd.runner import run

STEP_OBS = ("loss", "charges", "charge_drift", "update_horizontal_norm", "update_vertical_norm", "effective_lr",
            "curvature", "shock_number", "fold_number")


def _gauge_fix_run(tmp_path, name, **over):
    s = tiny_settings(20, **{"symmetry.mode": "gauge_fix", "optim.momentum": 0.0, "observables.names": STEP_OBS,
                             **over})
    return run(s, str(tmp_path / name)).trajectory


def test_gauge_fix_plain_sgd_step_is_a_gradient_step_at_the_canonical_point(tmp_path):
    """SGD without momentum on the section: Delta = -eta grad L(c(theta)), a horizontal vector at c(theta) whose
    canonical point is c(theta) itself, so effective_lr["global"] is eta and the vertical part of the step is
    rounding.  (The total update, jump included, gave effective learning rates of either sign and a vertical part
    as large as the step.)"""
    t = _gauge_fix_run(tmp_path, "gf")
    lr = 0.05
    np.testing.assert_allclose(t["effective_lr/global"], lr, rtol=2e-3)
    h, v = t["update_horizontal_norm"], t["update_vertical_norm"]
    assert np.all(h > 0) and np.all(v <= 1e-3 * h), np.max(v / h)
    np.testing.assert_allclose(t["shock_number"][1:], lr * np.maximum(-t["curvature"][1:], 0), rtol=1e-5, atol=1e-9)


def test_gauge_fix_observed_step_does_not_depend_on_the_starting_gauge(tmp_path):
    """From theta_0 and from a random g . theta_0 (init_gauge) the fixed dynamics take the same step from the same
    canonical point: every step observable agrees from step 0 (curvature / shock / fold, which describe the
    previous step, from step 1), while the charges of theta_0 differ."""
    a = _gauge_fix_run(tmp_path, "g0")
    b = _gauge_fix_run(tmp_path, "g2", init_gauge=2.0)
    assert not np.allclose(a["charges/rescale/layers.0"][0], b["charges/rescale/layers.0"][0], rtol=1e-2)
    for k in ("update_horizontal_norm", "update_vertical_norm", "effective_lr/global", "effective_lr/rescale/layers.0",
              "curvature", "shock_number", "fold_number"):
        np.testing.assert_allclose(a[k], b[k], rtol=2e-3, atol=1e-6, err_msg=k)


def test_gauge_fix_hessian_and_noise_observables_are_those_of_the_canonical_point(tmp_path):
    """The Hessian extremes and the gradient-noise temperature under gauge_fix describe the point the step is taken
    from, c(theta): the same from theta_0 and from a random g . theta_0 at every evaluation, step 0 included (they
    were evaluated at the stored theta, so at step 0 the horizontal and raw sharpness were those of the re-gauged
    initialisation)."""
    over = {"observables.hessian_every": 4, "observables.noise_every": 4, "observables.per_example_grads": True}
    a = _gauge_fix_run(tmp_path, "h0", **over)
    b = _gauge_fix_run(tmp_path, "h2", init_gauge=2.0, **over)
    keys = [f"{s}_{w}" for s in ("sharpness", "lambda_min") for w in ("quotient", "horizontal", "raw")]
    keys += ["shock_number_hessian", "fold_number_hessian", "noise_sigma2", "temperature"]
    for k in keys:
        np.testing.assert_allclose(a[k], b[k], rtol=2e-3, atol=1e-6, err_msg=k)
