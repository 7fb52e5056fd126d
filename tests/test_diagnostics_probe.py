"""Diagnostics on inputs beyond the main tests: option checking, vmapped trajectories, learning-rate schedules,
non-finite losses, and ``shock_aware_lr`` under ``optax.inject_hyperparams`` inside jit / scan."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from quotient_sgd.diagnostics import LiveDetector, detect, detect_run, shock_aware_lr


def _spiky(n=120):
    return np.r_[np.linspace(1.0, 0.5, n // 2), [3.0], np.linspace(0.5, 0.2, n - n // 2 - 1)]


@pytest.mark.parametrize("options, name", [
    ({"spike_factr": 3.0}, "spike_factr"),
    ({"block": -1}, "block"),
    ({"block": 0}, "block"),
    ({"spike_factor": 0.5}, "spike_factor"),
    ({"spike_window": 0}, "spike_window"),
    ({"eos_levels": 2.0}, "eos_levels"),
    ({"fold_levels": (-1.0,)}, "fold_levels"),
    ({"rearm": 2.0}, "rearm"),
    ({"transition_keys": "loss"}, "transition_keys"),
    ({"variants": ("quotent",)}, "variants"),
    ({"horizon": 0}, "horizon"),
    ({"alpha": 5.0}, "alpha"),
    ({"kinds": "shock"}, "kinds"),
])
def test_misspelt_or_out_of_range_options_are_refused_by_name(options, name):
    """A misspelt option was ignored and ``block=-1`` / ``spike_factor=0.5`` / ``eos_levels=2.0`` switched a
    detector off, made it fire at every step or raised a bare ``TypeError`` from inside a detector."""
    with pytest.raises((TypeError, ValueError), match=name):
        detect({"loss": _spiky(), "sharpness_quotient": np.full(120, 3.0)}, lr=1.0, **options)
    with pytest.raises((TypeError, ValueError), match=name):  # live: at construction, not at the first chunk
        LiveDetector(**options)


def test_a_repeated_kind_reports_its_events_once():
    loss = _spiky()
    assert detect({"loss": loss}, kinds=["loss_spike", "loss_spike"]) == detect({"loss": loss}, kinds=["loss_spike"])


def test_a_vmapped_trajectory_is_refused_not_read_as_eventless():
    """A ``(members, steps)`` loss switched every detector off: a divergent member gave ``[]``."""
    loss = np.stack([_spiky(), np.r_[np.ones(60), np.full(60, np.inf)]])
    assert detect({"loss": loss[1]}, kinds=["divergence"])
    with pytest.raises(ValueError, match="one member"):
        detect({"loss": loss}, kinds=["divergence"])
    with pytest.raises(ValueError, match="'step'"):  # a step key that does not number the rows
        detect({"loss": _spiky(), "step": np.arange(100)}, kinds=["loss_spike"])


def test_learning_rate_argument_is_checked_and_a_stored_single_value_broadcast():
    traj = {"loss": np.ones(50), "sharpness_quotient": np.full(50, 25.0)}
    with pytest.raises(ValueError, match="lr"):
        detect(traj, lr=np.ones(10), kinds=["edge_of_stability"])
    with pytest.raises(ValueError, match="lr"):  # eta < 0 with lambda < 0 read as past the edge
        detect({"loss": np.ones(50), "sharpness_quotient": np.full(50, -25.0)}, lr=-0.1,
               kinds=["edge_of_stability"])
    # a run's constant learning rate stored once in the trajectory (a 0-d array) failed to reshape
    ev = detect({**traj, "lr": np.float64(0.1)}, kinds=["edge_of_stability"])
    assert sorted(e.details["level"] for e in ev) == [1.0, 2.0]


def test_edge_of_stability_and_slice_shocks_use_the_learning_rate_of_their_step():
    """With a warm-up schedule the event reported ``lr[0]``, the first warm-up value, as the learning rate that
    crossed the edge; a slice shock's strength ``lr / shock_time`` used ``lr[0]`` too."""
    n = 60
    lr = np.r_[np.linspace(0.01, 1.0, 30), np.ones(30)]
    traj = {"loss": np.ones(n), "sharpness_quotient": np.full(n, 2.5)}
    ev = detect(traj, lr=lr, kinds=["edge_of_stability"])
    assert [e.details["level"] for e in ev] == [1.0, 2.0]
    for e in ev:
        assert e.observables["lr"] == pytest.approx(lr[e.step])
        assert e.observables["lr"] * e.observables["sharpness_quotient"] == pytest.approx(e.strength)
    (sh,) = detect(traj, lr=lr, kinds=["shock"], slice_shocks=[{"step": 40, "shock_time": 0.5}])
    assert sh.strength == pytest.approx(lr[40] / 0.5)


def test_a_spike_into_a_non_finite_loss_has_infinite_strength_and_no_warning():
    loss = np.r_[np.linspace(1.0, 0.5, 50), [np.nan] * 10]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "Mean of empty slice" from the NaN blocks
        ev = detect({"loss": loss, "grad_norm_canonical": loss}, kinds=["loss_spike", "divergence", "transition"])
    spikes = [e for e in ev if e.kind == "loss_spike"]
    assert [e.step for e in spikes] == [50] and spikes[0].strength == float("inf")  # was NaN


def _scan_scales(tx, get, steps=10):
    a = jnp.array([2.0, 0.5])

    def body(carry, _):
        p, s = carry
        u, s = tx.update(a * p, s, p)
        return (optax.apply_updates(p, u), s), get(s)

    p = jnp.ones(2)
    return jax.lax.scan(body, (p, tx.init(p)), None, length=steps)[1]


def test_shock_aware_lr_under_inject_hyperparams_inside_jit_and_scan():
    """``inject_hyperparams`` hands the numeric arguments over as tracers inside jit / scan: the argument checks
    raised ``TracerBoolConversionError``.  Injected, the transform must give the plain one's scales."""
    kw = dict(fold_target=1.0, policy="track", min_scale=0.1, max_scale=2.0, curvature_decay=0.3)
    injected = optax.inject_hyperparams(shock_aware_lr)(optax.sgd(1.5), **kw)
    got = jax.jit(lambda: _scan_scales(injected, lambda s: s.inner_state.scale))()
    want = _scan_scales(shock_aware_lr(optax.sgd(1.5), **kw), lambda s: s.scale)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(jnp.max(want)) > 1.0  # ``track`` lengthened a step: max_scale is in use
    with pytest.raises(ValueError, match="curvature_decay"):  # was a bare TypeError from a comparison
        shock_aware_lr(optax.sgd(0.1), curvature_decay="0.5")


def test_detect_run_redetects_a_mini_batch_run_with_the_runs_own_settings(tmp_path):
    """A mini-batch loss fluctuates by more than 2x step to step: ``quotient-sgd run`` judges spikes on a
    20-step mean and plans the change-point blocks for its ``steps``; ``detect_run`` used neither and rewrote the
    run's empty ``events.json`` with dozens of loss spikes."""
    rng = np.random.default_rng(0)
    n = 400
    loss = np.exp(-0.003 * np.arange(n) + 0.6 * rng.standard_normal(n))  # mini-batch losses, no transition
    np.savez(tmp_path / "trajectory.npz", loss=loss, step=np.arange(n))
    (tmp_path / "config.json").write_text('{"steps": 400, "optim": {"lr": 0.1}, "data": {"batch_size": 64}}')
    assert len(detect({"loss": loss}, kinds=["loss_spike"])) > 10  # the unsmoothed detector on this loss
    ev = detect_run(tmp_path)
    assert ev == detect({"loss": loss}, lr=0.1, horizon=400, spike_smooth=20)
    assert not [e for e in ev if e.kind == "loss_spike"]
    assert detect_run(tmp_path, write=False, spike_smooth=1, kinds=["loss_spike"])  # an explicit option wins
