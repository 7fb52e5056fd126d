"""Experiment scripts' tables read with the settings their detectors were given."""

import sys

import numpy as np

from helpers import EXPERIMENTS, experiment_script, never_run

sys.path.insert(0, EXPERIMENTS)


def test_catapult_table_reads_the_loss_spike_with_the_runs_own_spike_factor(monkeypatch):
    """Experiment 2 with ``spike_factor=3``: its detectors look for a loss of 3 x its recent minimum, but the table's
    ground truth read a spike at the default factor 2, so a run whose loss peaked at 2.5 x its initial value (no
    spike at the factor asked for) was tabulated as a catapult every variant had "missed".  The table now reads the
    ground truth with the run's own factor: the same run has "none (none expected)", and at the default factor the
    same loss is a spike that no catapult followed."""
    import _common as C

    E = experiment_script("catapult")
    n = 40
    steps = np.arange(n)
    loss = np.linspace(1.0, 0.5, n)
    loss[10:13] = [2.5, 2.0, 1.2]  # 2.5 x the initial loss: a spike at factor 2, none at factor 3
    refresh = np.where(steps % 4 == 0, steps, -1)
    lam = np.where(refresh >= 0, 30.0, np.nan)  # a flat sharpness: no catapult whatever the factor
    traj = {"step": steps, "hessian_step": refresh, "loss": loss, "sharpness_horizontal": lam,
            "sharpness_quotient": lam, "sharpness_raw": lam}
    monkeypatch.setattr(E, "setup", lambda cfg: (None, None, None, None, None, 30.0))
    monkeypatch.setattr(C, "record", lambda *a, **k: (None, {kk: v.copy() for kk, v in traj.items()}, 0.0))

    for factor, spiked in ((3.0, False), (2.0, True)):
        cfg = C.load_config("catapult", ["scale=test", f"spike_factor={factor}", f"seed={int(factor)}"])
        out = E.run(cfg)
        [row] = E.summarise(out)
        n_spikes = sum(e.kind == "loss_spike" for e in out["events"])
        assert n_spikes == int(spiked) and row["n loss spikes"] == n_spikes, (factor, row)
        assert row["spiked"] is spiked and row["loss_peak_ratio"] == 2.5, (factor, row)
        want = "missed" if spiked else "none (none expected)"
        assert all(row[f"catapult[{v}] step"] == want for v in ("quotient", "step", "raw")), (factor, row)


def test_grokking_ground_truth_of_a_run_whose_test_accuracy_peaked_before_memorisation():
    """Experiment 3's ground truth looked for the test-accuracy jump at the first step after memorisation within 0.9
    x the test accuracy's maximum; a run whose test accuracy peaked before memorisation and fell after it (it
    overfits, as short runs do) has no such step, and the script failed in a bare ``IndexError`` after training.
    Such a run has no jump: ``grokked`` False and the ``grok_*`` steps -1; a run that does jump is read as
    before."""
    G = experiment_script("grokking")
    s = np.arange(0, 2000, 50)
    train = np.minimum(1.0, np.linspace(0.2, 1.6, s.size))  # memorised (>= 0.99) from step 1100 on
    overfit = np.r_[np.linspace(0.05, 0.4, 20), np.linspace(0.35, 0.1, 20)]
    gt = G.ground_truth({"step": s, "train_accuracy": train, "test_accuracy": overfit})
    assert gt["memorised"] == int(s[np.argmax(train >= 0.99)]) and not gt["grokked"], gt
    assert (gt["grok_start"], gt["grok_mid"], gt["grok_end"]) == (-1, -1, -1), gt
    assert abs(gt["max_test_acc"] - 0.4) < 0.05, gt
    # a jump long after memorisation (steps 1700-1850) is still found
    grok = np.where(s < 1700, 0.1, np.where(s < 1850, 0.1 + 0.85 * (s - 1650) / 200, 0.97))
    gt = G.ground_truth({"step": s, "train_accuracy": np.minimum(1.0, np.linspace(0.2, 4.0, s.size)),
                         "test_accuracy": grok})
    assert gt["grokked"] and 1650 <= gt["grok_start"] < gt["grok_mid"] <= gt["grok_end"] <= 1900, gt


def test_normalised_cnn_running_rms_of_a_run_shorter_than_its_window():
    """Experiment 4's running RMS of the angular update over 50 steps, on a run of fewer steps (``num_steps=30``,
    allowed): ``np.convolve(..., mode="valid")`` swapped its arguments and gave 21 values of ``sqrt(30 / 50)`` times
    a constant angle, so the table reported the equilibrium "reached" at step 49 of a 30-step run whose angle was
    1.29 x the prediction.  A series shorter than the window has no running RMS (the equilibrium is "not
    reached"); a longer one is the RMS of each window of 50 steps, as before."""
    import types

    E = experiment_script("normalised_cnn")
    cfg = types.SimpleNamespace(lr=0.1, weight_decay=0.01, tail_fraction=0.25)
    pred = np.sqrt(2 * cfg.lr * cfg.weight_decay)
    ang = np.full(30, pred * np.sqrt(50 / 30))
    assert E.running_rms(ang).size == 0
    (row,) = E.summarise(cfg, {"traj": {"loss": np.ones(30), "angular_update/scale/convs.0": ang}})
    assert row["steps to within 10%"] == "not reached", row
    assert abs(row["ratio"] - np.sqrt(50 / 30)) < 1e-12, row
    rng = np.random.default_rng(0)
    ang = pred * (1 + 0.3 * rng.standard_normal(120))
    brute = np.sqrt([np.mean(ang[i:i + 50] ** 2) for i in range(120 - 49)])
    assert np.allclose(E.running_rms(ang), brute, rtol=1e-12, atol=0)


def _quadratic_loss(params, batch):
    return 0.5 * (batch[0] * params["w"][0] ** 2 + batch[1] * params["w"][1] ** 2)


def test_full_batch_recorder_runs_on_float64_parameters_and_measures_the_exact_curvature(x64):
    """The plain full-batch loop of experiments 1 and 2 (``record(..., observables="curvature")``) carried the step
    length of the last step as a float32 zero: on float64 parameters (``JAX_ENABLE_X64=1``) its scan failed in a
    bare "carry input and carry output must have equal types".  It now carries it in the parameters' precision;
    on a quadratic the directional curvature along each step and the fold number of row ``k`` (step ``k - 1``'s)
    are the closed forms ``Delta^T H Delta / |Delta|^2`` and ``lr max(0, kappa)``, across chunk boundaries."""
    import jax.numpy as jnp
    import optax

    import _common as C

    h = np.array([2.0, 5.0])
    w0 = np.array([1.0, -0.5])
    lr = 0.3
    params = {"w": jnp.asarray(w0, jnp.float64)}
    _, traj, _ = C.record(_quadratic_loss, params, optax.sgd(lr), None, jnp.asarray(h), 5, hessian_every=2,
                          observables="curvature", decomposition=False)
    assert traj["curvature"].dtype == np.float64
    w, kappa = w0.copy(), [0.0]
    for _ in range(4):  # row k + 1 holds step k's curvature
        step = -lr * h * w
        kappa.append(float(step @ (h * step) / (step @ step)))
        w = w + step
    np.testing.assert_allclose(traj["curvature"], kappa, rtol=1e-13, atol=0)
    np.testing.assert_allclose(traj["fold_number"], lr * np.maximum(kappa, 0.0), rtol=1e-13, atol=0)
    np.testing.assert_array_equal(traj["shock_number"], np.zeros(5))


def _cubic_loss(params, batch):
    a = params["w"][0]
    return -(a**3) + batch * a**2


def test_hj_slices_shock_time_of_a_slice_whose_sharpest_concavity_is_at_its_end(x64, monkeypatch):
    """Experiment 5's inviscid slice shock time ``t* slice`` read the slope of the sampled loss from
    ``np.gradient``, whose end values are first-order (off by ``L'' dx / 2``), through ``shock_time``'s one-sided end
    stencils: on ``L = -a^3 + 0.75 a^2`` (``L'' = 1.5 - 6 a``, most concave at the slice's right end) with 41
    points it gave 0.789 for ``1 / 1.5 = 0.667`` on ``[-0.5, 0.5]``, and 11.4 on ``[-0.1, 0.1]``, where ``L'' > 0``
    and no shock forms (``inf``).  The slope is now the loss's derivative along the slice by autodiff."""
    import types

    import jax.numpy as jnp

    E = experiment_script("hj_slices")
    monkeypatch.setattr(E.hj, "slice_flow", never_run)  # (the flow's row entries are not checked here)
    cfg = types.SimpleNamespace(n=41, flow_time_factor=2.0, nu_rel=1e-2, max_steps=100)
    pc = {"w": jnp.zeros(2, jnp.float32)}
    d = {"w": jnp.asarray([1.0, 0.0], jnp.float32)}
    for extent, want in ((0.5, 1 / 1.5), (0.1, np.inf)):
        row = E._one_slice(cfg, _cubic_loss, jnp.asarray(0.75, jnp.float32), pc, d, extent, 0, -1.0, 1.0, 0.1, [])
        assert row["shocks at t"].startswith("flow failed"), row
        if np.isfinite(want):
            assert abs(row["t* slice"] / want - 1) < 1e-10, (extent, row)
        else:
            assert row["t* slice"] > 1e12, (extent, row)  # L'' >= 0: at most rounding of L'' = 0 at the end


def test_normalised_cnn_refuses_a_weight_decay_of_zero_before_computing(tmp_path, monkeypatch):
    """Experiment 4 with ``weight_decay=0`` (allowed by the rules shared with the other experiments) trained the CNN
    and then failed in a bare ``ZeroDivisionError`` in its table: the equilibrium ``sqrt(2 lr weight_decay)`` it
    compares with is 0.  It is now refused before anything is computed, naming the key; a positive decay runs."""
    import pytest

    E = experiment_script("normalised_cnn")
    monkeypatch.setenv("QSGD_EXPERIMENT_OUT", str(tmp_path))
    monkeypatch.setattr(E, "run", never_run)
    with pytest.raises(SystemExit) as err:
        E.main(["weight_decay=0"])
    assert "weight_decay=0.0" in str(err.value.code) and "> 0" in str(err.value.code)
    with pytest.raises(AssertionError, match="computed"):  # a positive decay reaches the computation
        E.main(["weight_decay=0.001", "overwrite=true"])
