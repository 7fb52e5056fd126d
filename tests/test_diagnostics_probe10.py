"""The change-point detector on full-batch runs: a noiseless loss whose rate drifts smoothly is not a sequence of
transitions, while abrupt changes in noisy runs are found as before (``trend_floor``, ``rate_floor``)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from quotient_sgd import models
from quotient_sgd.data import teacher_student
from quotient_sgd.diagnostics import LiveDetector, cusum, detect
from quotient_sgd.optim import SGDSpec, quotient_trajectory, set_hyperparams, train


def _mse(graphdef, p, batch):
    pred = nnx.merge(graphdef, p)(batch[0])
    return 0.5 * jnp.mean(jnp.sum(jnp.square(pred - batch[1]), axis=-1))


def _full_batch(batch, step, key):
    return batch


@pytest.fixture(scope="module")
def quiet_runs():
    """Full-batch GD on a 4-16-16-1 ReLU MLP, teacher-student regression (64 examples), 100 steps, every default
    quotient observable recorded: ``{(seed, lr): trajectory}`` (one compiled run, the learning rate injected)."""
    ds = teacher_student(seed=0, n_train=64, n_test=1, din=4)
    batch = (ds.x_train, 3.0 * ds.y_train)
    model = models.MLP(4, (16, 16), 1, activation="relu", rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(model, nnx.Param)
    tx = quotient_trajectory(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), model.symmetries(),
                             spec=SGDSpec("learning_rate"))
    out = {}
    for seed, lr in ((0, 0.02), (0, 0.05), (2, 0.02), (2, 0.05)):
        p0 = nnx.split(models.MLP(4, (16, 16), 1, activation="relu", rngs=nnx.Rngs(seed)), nnx.Param)[1]
        state = set_hyperparams(tx.init(p0), learning_rate=lr)
        _, _, traj = train(functools.partial(_mse, graphdef), p0, tx, functools.partial(_full_batch, batch),
                           num_steps=100, opt_state=state, donate=False)
        out[(seed, lr)] = jax.tree.map(np.asarray, traj)
    return out


def test_no_transition_on_quiet_full_batch_gd_runs(quiet_runs):
    """The loss falls monotonically and at a smoothly changing rate; the gradient norm and the invariant norms
    drift smoothly.  No ``transition`` event on any monitored key, with or without the planned horizon (3-6 alarms
    a run, one every 15-20 steps, on loss, gradient norms and invariant norms, judged against the noise of the
    series' own drift)."""
    for (seed, lr), traj in quiet_runs.items():
        loss = traj["loss"]
        assert np.all(np.diff(loss) < 0) and loss[-1] < 0.2 * loss[0], (seed, lr)  # quiet: a monotone decay
        for opts in ({}, {"horizon": 100}):
            ev = detect(traj, kinds=["transition"], **opts)
            assert ev == [], (seed, lr, opts, [(e.step, e.details["observable"]) for e in ev])


def _smooth_series(n):
    """Noiseless losses with a smoothly changing log-rate: a sum of decaying exponentials, a power law, and a rate
    that changes three-fold (up or down) along a logistic of width n / 5."""
    t = np.arange(n, dtype=np.float64)
    lam = np.geomspace(3e-4, 0.3, 6)
    out = {"sum_exp": np.exp(-np.outer(lam, t)).sum(0), "power": (1.0 + t / 10.0) ** -1.5}
    for f in (1 / 3, 3.0):
        rate = 5e-3 * (1 + (f - 1) / (1 + np.exp(-(t - 0.5 * n) / (n / 5))))
        out[f"rate_x{f:.2f}"] = np.exp(-np.cumsum(rate))
    return out


@pytest.mark.parametrize("n", [100, 500, 2000])
def test_no_transition_on_smooth_noiseless_decays(n):
    for name, loss in _smooth_series(n).items():
        assert np.all(np.diff(loss) < 0)
        ev = detect({"loss": loss}, kinds=["transition"], horizon=n)
        assert ev == [], (name, [(e.step, e.details["onset_step"]) for e in ev])


@pytest.mark.parametrize("n", [100, 2000])
def test_a_rate_that_starts_to_drift_by_a_few_percent_is_not_a_transition(n):
    """A noiseless exponential decay whose rate then drifts by 2-4 % (a logistic of width n / 20): where the drift
    starts the trend of the constant stretch is not significant and the spread is rounding, so that the trend floor
    alone raises an alarm; a change of the rate within ``k * rate_floor`` (5 %) of the rate is none."""
    t = np.arange(n, dtype=np.float64)
    for f in (0.96, 0.98, 1.02, 1.04):
        loss = np.exp(-np.cumsum(5e-3 * (1 + (f - 1) / (1 + np.exp(-(t - 0.5 * n) / (n / 20))))))
        assert detect({"loss": loss}, kinds=["transition"], horizon=n) == [], f
        # the floors are what keeps it quiet
        assert detect({"loss": loss}, kinds=["transition"], horizon=n, rate_floor=0, trend_floor=0), f


def _abrupt(kind, seed, n=1000, at=600):
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    if kind == "faster":  # the rate jumps ten-fold, noisy loss
        return np.exp(-np.cumsum(np.where(t < at, 1e-3, 1e-2)) + 0.02 * rng.standard_normal(n))
    if kind == "plateau_then_drop":
        return np.where(t < at, 1.0, np.exp(-0.02 * (t - at))) * np.exp(1e-3 * rng.standard_normal(n))
    # the decay stops, a noisy rate
    return np.exp(-np.cumsum(np.where(t < at, 4e-3, 0.0) + 1e-3 * rng.standard_normal(n)))


@pytest.mark.parametrize("kind", ["faster", "plateau_then_drop", "stops"])
def test_abrupt_changes_with_noise_are_detected_at_the_same_step(kind):
    """An abrupt change of the loss's rate at step 600: the first event from step 600 on is at most 60 steps
    later, its onset within 60 steps of the change, and every event is where it is without the floor
    (``trend_floor=0``, the noise estimate alone)."""
    for seed in range(3):
        loss = _abrupt(kind, seed)
        ev = detect({"loss": loss}, kinds=["transition"], horizon=len(loss))
        after = [e for e in ev if e.step >= 600]
        assert after and after[0].step <= 660, (seed, [e.step for e in ev])
        assert abs(after[0].details["onset_step"] - 600) <= 60
        no_trend = detect({"loss": loss}, kinds=["transition"], horizon=len(loss), trend_floor=0)
        assert [e.step for e in no_trend] == [e.step for e in ev]
        bare = detect({"loss": loss}, kinds=["transition"], horizon=len(loss), trend_floor=0, rate_floor=0)
        assert abs(min(e.step for e in bare if e.step >= 600) - after[0].step) <= ev[0].details["block"]


def test_cusum_trend_floor_on_a_ramp_and_a_break_of_it():
    """A noiseless straight ramp alarms every ~10 values against its own spread; with ``trend_floor=3`` it gives no
    alarm, and a jump of the ramp is found at the jump.  On values without a trend (iid noise with a shift) the
    floor changes nothing."""
    x = 0.01 * np.arange(120.0)
    assert len(cusum(x)) >= 3
    assert cusum(x, trend_floor=3.0) == []
    y = x + np.where(np.arange(120) >= 80, 2.0, 0.0)
    al = cusum(y, trend_floor=3.0)
    assert al and 80 <= al[0].index <= 90 and al[0].onset == 80 and al[0].direction == 1
    rng = np.random.default_rng(5)
    for _ in range(20):
        z = rng.standard_normal(100) + np.where(np.arange(100) >= 60, 1.5, 0.0)
        plain, floored = [a.index for a in cusum(z)], [a.index for a in cusum(z, trend_floor=3.0)]
        assert any(60 <= i <= 80 for i in floored), floored
        if all(i >= 60 for i in plain):  # (an earlier alarm is a false one, and restarts the test)
            assert floored == plain


@pytest.mark.parametrize("name", ["trend_floor", "relative_floor", "rate_floor"])
@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "3", True])
def test_a_floor_out_of_range_is_refused(name, bad):
    if name != "rate_floor":
        with pytest.raises(ValueError, match=f"{name}="):
            cusum(np.ones(20), **{name: bad})
    if name != "relative_floor":
        with pytest.raises(ValueError, match=f"{name}="):
            detect({"loss": np.ones(20)}, kinds=["transition"], **{name: bad})


def test_live_detection_with_the_trend_floor_equals_one_detect_call(quiet_runs):
    """The floor reads the values before each one only: live chunks of any size give detect's events, on a quiet
    run (none) and on a loss whose decay stops."""
    traj = quiet_runs[(0, 0.05)]
    trend = {"loss": _abrupt("stops", 0)}
    for tr in (traj, trend):
        n = len(tr["loss"])
        full = detect(tr, kinds=["transition"], horizon=n)
        for size in (7, 33):
            live = LiveDetector(kinds=["transition"], horizon=n)
            for a in range(0, n, size):
                live.update(jax.tree.map(lambda v, a=a: v[a:a + size], tr))
            assert [e.to_dict() for e in live.events] == [e.to_dict() for e in full], size
    assert detect(trend, kinds=["transition"], horizon=1000)  # (the break is there to be found)
