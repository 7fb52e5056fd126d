"""Experiments 1-3: the transition happens, asserted from loss / accuracy / sharpness, and the detector reports it
within a stated window.  Experiments 1-2 run their fast ``scale=test`` configs, with the CPU defaults marked slow;
grokking runs its CPU default (the test scale's detection was not reproducible across seeds).  Experiment 5 (HJ
slices) runs end to end at a smoke size: its output files and the identities between its columns."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

EXPERIMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments")
sys.path.insert(0, EXPERIMENTS)

import _common as C  # noqa: E402


def _eos(scale, *overrides):
    import edge_of_stability as E

    cfg = C.load_config("edge_of_stability", [f"scale={scale}", *overrides])
    out = E.run(cfg)
    return cfg, out, {r["run"]: r for r in E.summarise(out)}


def _check_eos(cfg, out, rows, seed_zero=True):
    """The detector's claims; ``seed_zero`` adds the claims of the seed-0 setting (its transition is a clean
    edge of stability, the twin's gauge factor > 1.2 x and canonical sharpness at the edge > 5% apart), which
    other seeds need not share (a catapult into the edge on seed 1, a 1.17 x gauge on seed 2)."""
    lr = out["lr"]
    for name, r in out["runs"].items():
        s, lam = C.sampled(r["traj"], "sharpness_horizontal")
        # the transition: the loss stops decreasing monotonically (first increase at t_true) and from then on
        # lr * lambda_step hovers around 2
        loss = r["traj"]["loss"]
        assert np.any(np.diff(loss) > 0), name
        t_true = int(np.argmax(np.diff(loss) > 0)) + 1
        after = lr * lam[s >= t_true]
        assert 1.7 <= np.mean(after) <= 2.3, (name, after)
        if seed_zero:
            assert np.max(after) < 2.6, (name, after)
        # stated window: the detector's level-2 crossing at most 50 steps before the first loss increase and at
        # most one Hessian refresh after it
        e = C.first(r["events"], "edge_of_stability", "step", level=2.0)
        assert e is not None and t_true - 50 <= e.step <= t_true + cfg.hessian_every, (name, e and e.step, t_true)
        d = e.details
        np.testing.assert_allclose(d["lr_times_lambda_step"], d["lr_times_lambda_canonical"] * d["gauge_factor"],
                                   rtol=1e-5)
    # the re-gauged twin: same function, unbalanced charges, a larger gauge factor predicted by the charges,
    # and it reaches the edge earlier, at a different canonical sharpness
    b, g = rows["balanced"], rows["regauged"]
    np.testing.assert_allclose(b["lr*lambda_canonical(0)"], g["lr*lambda_canonical(0)"], rtol=1e-3)
    assert g["gauge(0)"] > b["gauge(0)"]
    np.testing.assert_allclose(g["gauge_charges(0)"], g["gauge(0)"], rtol=0.1)
    assert g["EoS step (detector, step variant)"] < b["EoS step (detector, step variant)"]
    if seed_zero:
        assert g["gauge(0)"] > 1.2 * b["gauge(0)"]
        assert abs(g["lambda_canonical at edge"] / b["lambda_canonical at edge"] - 1) > 0.05


def test_edge_of_stability_fast():
    # the first 115 steps of the test-scale runs (150): on seed 0 the balanced run's loss first increases at step
    # 105 and the re-gauged twin's at 13, the detector's crossings are at 59 and 6, and every claim is checked on
    # the steps after them; the run time is the training with a Hessian every step (~8 s of 11 for 150 steps)
    _check_eos(*_eos("test", "num_steps=115"))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_edge_of_stability_cpu(seed):
    """The CPU default (400 steps, Hessian every step) on seeds 0-4: the edge of both runs found within its window
    and the twin's first.  With the Hessian every 10 steps the twin's edge was missed on seeds 1 (a catapult
    between two samples) and 4 (at 1.97-1.996 at the samples).  The test scale runs the first 150 steps of the
    same runs, which hold every edge and first loss increase of seeds 0-4."""
    _check_eos(*_eos("cpu", f"seed={seed}"), seed_zero=seed == 0)


def _catapult(scale):
    import catapult as E

    cfg = C.load_config("catapult", [f"scale={scale}"])
    return cfg, E.run(cfg), E.run(cfg, eta_lambda0=1.5)


def _check_catapult(cfg, out, calm):
    import catapult as E

    gt = E.ground_truth(out["traj"], out["lr"])
    # the transition: loss spike (> 10x), then the sharpness the step sees ends below 2 / lr, training converges
    assert gt["loss_peak_ratio"] > 10 and gt["lr*lambda_step end"] < 2.0 and gt["final loss"] < out["traj"]["loss"][0]
    # stated window: catapult (quotient, orbit-invariant) with onset at or before the loss peak, confirmed within
    # 3 Hessian refreshes after the peak
    e = C.first(out["events"], "catapult", "quotient")
    assert e is not None and e.step <= gt["peak_step"] <= e.details["confirm_step"]
    assert e.details["confirm_step"] <= gt["peak_step"] + 3 * cfg.hessian_every
    es = C.first(out["events"], "catapult", "step")
    assert es is not None and "gauge_factor" in es.details["before"]
    # control run below the edge: no spike, no catapult event (no false alarm)
    assert not [x for x in calm["events"] if x.kind in ("catapult", "loss_spike")]


def test_catapult_fast():
    _check_catapult(*_catapult("test"))


@pytest.mark.slow
def test_catapult_cpu():
    _check_catapult(*_catapult("cpu"))


_GROK_SCRIPT = r"""
import json, sys, jax
sys.path.insert(0, sys.argv[1])
import _common as C, grokking as G
cfg = C.load_config("grokking", sys.argv[2:])
with jax.numpy_dtype_promotion("standard"):  # optax.adamw's bias correction mixes int32 and float
    out = G.run(cfg)
events = [{"kind": e.kind, "variant": e.variant, "step": int(e.step), "details": repr(e.details)}
          for e in out["events"]]
print("RESULT " + json.dumps({"events": events, "ground_truth": G.ground_truth(out["sub"])}))
"""


def _grok(scale, *overrides):
    """Experiment 3 at ``scale`` (with the config ``overrides``, ``key=value``) as a one-device script (what
    experiments/README.md reports), in a subprocess at XLA's default optimisation level (5000 steps of a Transformer
    run ~1.5x longer at the suite's level 0): ``(events, ground truth)``."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    res = subprocess.run([sys.executable, "-c", _GROK_SCRIPT, EXPERIMENTS, f"scale={scale}", *overrides], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    return [types.SimpleNamespace(**e) for e in out["events"]], out["ground_truth"]


def _check_grok_transition(gt):
    # the transition: memorisation early, test accuracy jumps to > 0.8 at least 500 steps later
    assert gt["grokked"] and gt["memorised"] >= 0 and gt["max_test_acc"] > 0.8, gt


def _check_grok_detected(events, gt):
    # stated window: a transition event on a training-side quotient observable after memorisation and no later
    # than the end of the test-accuracy jump
    ev = [e for e in events if e.kind == "transition" and e.variant == "quotient"]
    assert any(gt["memorised"] <= e.step <= gt["grok_end"] for e in ev), ([(e.step, e.details) for e in ev], gt)


def test_grokking_transition_happens_and_is_detected():
    # the CPU default's setting at 2.5 x its learning rate (lr 2.5e-3) for 2400 steps, under half the CPU default's
    # training: seed 0 memorises at step 50, its test accuracy jumps 1450-2000 (0.64 -> 0.98, median-smoothed), and
    # a quotient transition (the W_V W_O invariant norm, step 1300, onset 650) comes 150 steps before the rise, as
    # the CPU default's W_V W_O change point comes before its rise (experiments/README.md).  Seeds 1 and 2 alike
    # (jumps 1550-1850 and 1500-2100, events at 1200 and 1250); with lr 2e-3 over 3000 steps, seeds 0 and 1 too.
    # The same assertions as the CPU default's test below (slow), which keeps the documented instance; at
    # ``scale=test`` (lr 3e-3, 1800 steps) seed 5 has no event here (jump 1300-1550).
    events, gt = _grok("cpu", "lr=0.0025", "num_steps=2400")
    _check_grok_transition(gt)
    _check_grok_detected(events, gt)


@pytest.mark.slow  # the same property, fast: test_grokking_transition_happens_and_is_detected
def test_grokking_cpu_transition_happens_and_is_detected():
    # the CPU default (5000 steps, ~40-60 s), not ``scale=test``: at the test scale one seed of seven (seed 5, before
    # its jump) raises a transition event when run as a one-device script, and a CUSUM on the test loss itself
    # finds none of the jumps (experiments/README.md, "Across seeds"); seed 0's event
    # under the tests' 8 CPU devices came from their float rounding.  The CPU default's change points after
    # memorisation come on seeds 0 and 1 alike.  One test for both properties: as two tests sharing a module
    # fixture, the run was built twice in the suite (once per test, ~60 s each).
    events, gt = _grok("cpu")
    _check_grok_transition(gt)
    _check_grok_detected(events, gt)


def test_hj_slices_smoke(tmp_path, monkeypatch):
    """Experiment 5 (experiments/hj_slices.py) end to end at its smoke size (``scale=test``: a smaller MLP, one
    slice per checkpoint): the documented files hold one row per (checkpoint, extent) with finite numbers, the
    derived columns are what they are documented to be (t* Hessian = 1 / max(0, -lambda_min), the ratio, the
    shock number lr |lambda_min|), and the ``shock[slice]`` events are exactly the slices whose flow formed a
    shock."""
    import hj_slices as E

    monkeypatch.setenv("QSGD_EXPERIMENT_OUT", str(tmp_path))
    E.main(["scale=test"])
    cfg = C.load_config("hj_slices", ["scale=test"])
    d = tmp_path / "hj_slices"
    for f in ("trajectory.npz", "events.json", "result.json", "result.md", "hj_slices.png"):
        assert (d / f).is_file() and (d / f).stat().st_size > 0, f
    res = C.load_result(d / "result.json")
    rows, lr = res["table"], res["lr"]
    assert np.isfinite(lr) and lr > 0
    assert [(r["step"], r["extent"]) for r in rows] == [(s, e) for s in cfg.checkpoints for e in cfg.extents]
    np.testing.assert_array_equal(np.load(d / "trajectory.npz")["step"], [r["step"] for r in rows])
    for r in rows:
        lmin = r["lambda_min (quotient)"]
        for k in ("lambda_min (quotient)", "t* slice", "L''(0) on slice", "min L'' on slice", "flow t", "nu"):
            assert np.isfinite(r[k]), (k, r)
        t_hess = 1.0 / max(0.0, -lmin) if lmin < 0 else np.inf
        np.testing.assert_allclose(r["t* Hessian"], t_hess, rtol=1e-6)
        np.testing.assert_allclose(r["ratio slice/Hessian"], r["t* slice"] / r["t* Hessian"], rtol=1e-12)
        np.testing.assert_allclose(r["shock number lr*|lambda_min|"], lr * max(0.0, -lmin), rtol=1e-6)
        # the slice's inviscid shock time is -1 / min L'' (up to the two derivative stencils on the grid)
        assert r["min L'' on slice"] < 0 and r["t* slice"] > 0
        np.testing.assert_allclose(r["t* slice"], -1.0 / r["min L'' on slice"], rtol=0.25)
    from quotient_sgd.diagnostics import load_events

    ev = load_events(d / "events.json")
    shocked = [r for r in rows if isinstance(r["shocks at t"], int) and r["shocks at t"] > 0]
    # at initialisation the slice is concave enough that the flow, run to twice the predicted time, shocks
    assert shocked and shocked[0]["step"] == 0
    assert [(e.kind, e.variant, e.step) for e in ev] == [("shock", "slice", r["step"]) for r in shocked]
    for e, r in zip(ev, shocked):
        assert e.details["shock_time"] == r["t* slice"] and e.details["extent"] == r["extent"]
