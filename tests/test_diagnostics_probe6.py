"""Diagnostics: argument checks and trajectories of unusual shapes."""

import numpy as np
import optax
import pytest

from quotient_sgd.diagnostics import cusum_threshold, detect, LiveDetector, shock_aware_lr
from quotient_sgd.diagnostics import _cusum
from quotient_sgd.diagnostics._cusum import _max_statistic


@pytest.mark.parametrize("name", ["init_scale", "min_scale", "max_scale"])
def test_a_schedule_given_as_a_scale_is_refused_by_name(name):
    # The targets take schedules, the scales do not: a schedule as min_scale / max_scale failed in a bare "'>' not
    # supported between instances of 'function' and 'float'", as init_scale in "float() argument must be ...".
    with pytest.raises(ValueError, match=rf"shock_aware_lr: {name}=<function .* is not allowed; need a finite "
                                         r"number > 0 \(a number: the scales take no schedule\)"):
        shock_aware_lr(optax.sgd(0.1), **{name: lambda count: 0.5})
    with pytest.raises(ValueError, match=rf"shock_aware_lr: {name}=True is not allowed; need a finite number > 0 "
                                         r"\(a number"):
        shock_aware_lr(optax.sgd(0.1), **{name: True})
    # the targets still take schedules
    shock_aware_lr(optax.sgd(0.1), fold_target=lambda count: 1.5, shock_target=lambda count: 1.0)


def test_cusum_threshold_holds_an_alpha_below_one_over_the_simulation_count():
    # The threshold was the 1 - alpha quantile of num_sims simulated series whatever alpha: below 1 / num_sims that
    # is the largest simulated value or near it, and the achieved false-alarm rate was near 1 / num_sims on average
    # over seeds (1e-4 measured at alpha = 1e-5 with the default 4000; here 4.1e-3 at alpha = 1e-3 with 200).  At
    # least 20 / alpha series are simulated now (measured 1.05e-3).  The rate is measured on 200000 fresh
    # stationary series, independent of the thresholds' seeds.
    n, alpha = 20, 1e-3
    stats = _max_statistic(np.random.default_rng(12345).standard_normal((200000, n)), 0.5, 10, 4.0)
    rates = [float(np.mean(stats > cusum_threshold(n, alpha, num_sims=200, seed=seed))) for seed in range(10)]
    assert np.mean(rates) < 1.5 * alpha, rates
    # the first num_sims series are those of one draw: a threshold that needs no more keeps its value
    first = _max_statistic(np.random.default_rng(0).standard_normal((4000, n)), 0.5, 10, 4.0)
    assert cusum_threshold(n, 0.05) == float(np.quantile(first, 0.95))


def test_live_detector_refuses_a_bad_chunk_and_goes_on_as_before_it():
    # A chunk with a leading member axis (a vmapped run) was kept: its 'loss' of another per-step shape was dropped
    # from the joined trajectory, the error said "a trajectory needs at least the 'loss' key", and so did every
    # later update.  A chunk detect refuses (repeated steps) was kept too, failing every later update.  Both are
    # refused by name and not kept.
    chunks = [{"loss": np.linspace(1.0, 0.5, 30), "step": np.arange(30)},
              {"loss": np.r_[0.5, 3.0, np.linspace(0.5, 0.4, 20)], "step": np.arange(30, 52)}]
    live = LiveDetector(kinds=["loss_spike", "divergence"])
    assert live.update(chunks[0]) == []
    with pytest.raises(ValueError, match=r"LiveDetector.update: a chunk's 'loss' must hold one value per step, "
                                         r"shape \(steps,\); got shape \(2, 5\)"):
        live.update({"loss": np.ones((2, 5))})
    with pytest.raises(ValueError, match="'step' key must be strictly increasing"):
        live.update({"loss": np.ones(3), "step": np.arange(28, 31)})
    new = live.update(chunks[1])
    whole = detect({k: np.concatenate([c[k] for c in chunks]) for k in ("loss", "step")},
                   kinds=["loss_spike", "divergence"])
    assert new == whole == live.events and [(e.step, e.kind) for e in whole] == [(31, "loss_spike")]


@pytest.mark.parametrize("options", [dict(weight_decay=0.1), dict(weight_decay=0.1, momentum=0.9),
                                     dict(weight_decay=0.1, adaptive=True)])
def test_rows_without_a_learning_rate_are_read_without_one_under_weight_decay(options):
    # The trajectory's 'lr' key may be NaN on rows that have none (a live chunk recorded before the key was); with
    # weight_decay the per-row edges and fold levels were computed at decay = NaN too, and stability_edge /
    # fold_edge refused the whole trajectory ("decay=nan is not allowed").  Those rows have no level now; the rows
    # with a learning rate give the events they give when every row has one.
    n = 60
    traj = {"loss": np.ones(n), "sharpness_quotient": np.r_[np.full(45, 5.0), np.full(15, 25.0)],
            "fold_number": np.r_[np.full(45, 0.5), np.full(15, 2.5)],
            "sharpness_preconditioned": np.r_[np.full(45, 5.0), np.full(15, 500.0)]}
    kinds = ["edge_of_stability", "fold"]
    got = detect({**traj, "lr": np.r_[np.full(35, np.nan), np.full(25, 0.1)]}, kinds=kinds, **options)
    want = detect({**traj, "lr": np.full(n, 0.1)}, kinds=kinds, **options)
    assert got == want and {e.step for e in got} == {45}
    eos = [e.details["level"] for e in got if e.kind == "edge_of_stability" and e.variant == "quotient"]
    if not options.get("adaptive"):  # level 1 at half the edge, stability_edge(beta) - lr * weight_decay
        edge = 2 * (1 + options.get("momentum", 0.0)) - 0.1 * 0.1
        assert eos[0] == pytest.approx(edge / 2, rel=1e-12)


def test_cusum_threshold_below_what_its_simulations_resolve_is_extrapolated_conservatively(monkeypatch):
    # Simulating 20 / alpha series has a cap (2^25 values; lowered here to keep the test fast): below it the
    # threshold extrapolates an exponential tail, which must keep the false-alarm rate at or below alpha, and
    # an alpha of 1e-9 must not try to simulate 2e10 series.
    monkeypatch.setattr(_cusum, "_MAX_VALUES", 2**18)  # 13107 series of 20 blocks: alpha >= 1.5e-3 resolved
    n = 20
    stats = _max_statistic(np.random.default_rng(12345).standard_normal((200000, n)), 0.5, 10, 4.0)
    hs = [cusum_threshold(n, alpha, seed=7) for alpha in (1e-3, 1e-4, 1e-9)]  # (seed 7: not another test's cache)
    assert hs[0] < hs[1] < hs[2] < np.inf
    assert float(np.mean(stats > hs[1])) <= 1e-4  # measured 5.5e-5
