"""The diagnostics and the experiment scripts on cases beyond their tests: fold levels under a learning-rate
schedule with coupled weight decay, strict JSON from the experiment scripts."""

import json

import numpy as np
import pytest

from helpers import experiment_script

from quotient_sgd.diagnostics import detect


def _fold_trajectory(lr, h, steps):
    """What ``quotient_trajectory`` records on the quadratic ``h/2 |theta|^2`` (curvature ``h`` along every step)
    with SGD's coupled weight decay and a spec: row ``k`` holds step ``k - 1``'s fold number ``lr(k - 1) * h``
    (0 at step 0)."""
    steps = np.asarray(steps)
    fold = np.where(steps == 0, 0.0, np.array([lr(s - 1) for s in steps]) * h)
    return {"loss": np.linspace(1.0, 0.5, len(steps)), "step": steps, "fold_number": fold,
            "lr": np.array([lr(s) for s in steps])}


def test_fold_levels_with_coupled_decay_use_the_learning_rate_of_the_step_the_fold_number_describes():
    """``detect_fold`` with ``weight_decay`` placed row ``k``'s levels with row ``k``'s learning rate, although
    the fold number recorded there is step ``k - 1``'s: under a warm-up from 0.3 to 0.8 at step 3
    (``weight_decay=1``, curvature 1.2) it read step 2's 0.36 (``eta (h + wd) = 0.66``: no fold) as a fold at
    step 3 against ``1 - 0.8``, and the true fold of step 3 (1.76) was swallowed by that episode.  Measured on
    ``train`` with ``add_decayed_weights`` before ``sgd`` and an ``SGDSpec`` (the same numbers).  Now the levels
    of the per-step number use step ``k - 1``'s rate: one event, at row 4, level ``1 - 0.8``; with records every
    2 steps and a linear warm-up the rate of step ``k - 1`` is interpolated between the records (exact), and a
    number held over the rows after its record (``train`` with ``every=2``) keeps the rate of the step it
    describes (the held row was read with the next step's rate: an event at step 11 for step 9's 0.99)."""
    h, wd = 1.2, 1.0
    jump = _fold_trajectory(lambda s: 0.3 if s < 3 else 0.8, h, np.arange(8))
    (ev,) = detect(jump, kinds=["fold"], weight_decay=wd, fold_levels=(1.0,))
    assert ev.step == 4 and np.isclose(ev.strength, 0.8 * h) and np.isclose(ev.details["level"], 1 - 0.8)
    assert np.isclose(ev.details["decay"], 0.8 * wd)
    # every event is a step whose eta (h + wd) >= 1, found at the next record; a linear warm-up every 2 steps
    ramp = lambda s: min(0.05 * s, 0.6)  # noqa: E731
    sparse = _fold_trajectory(ramp, h, np.arange(0, 40, 2))
    (ev,) = detect(sparse, kinds=["fold"], weight_decay=wd, fold_levels=(1.0,))
    first = next(s for s in range(1, 40, 2) if ramp(s) * (h + wd) >= 1)  # the first odd step that folds
    assert ev.step == first + 1 and np.isclose(ev.details["level"], 1 - ramp(first) * wd)
    # train(every=2) keeps a row per step, each number held over the row after its record
    held = _fold_trajectory(ramp, h, np.arange(40))
    held["fold_number"] = held["fold_number"][np.arange(40) // 2 * 2]
    (ev,) = detect(held, kinds=["fold"], weight_decay=wd, fold_levels=(1.0,))
    assert ev.step == first + 1 and np.isclose(ev.details["level"], 1 - ramp(first) * wd)


def test_experiment_results_are_strict_json_and_read_back(tmp_path, monkeypatch):
    """``result.json`` was written with ``json.dump(..., default=float)``: a table holding NaN / inf (an edge never
    reached, a Hessian shock time of a convex slice) came out as bare ``NaN`` / ``Infinity``, which strict JSON
    readers (``jq``, ``JSON.parse``) refuse; a NumPy integer was written as a float (``3.0``), and an array left the
    file half-written (``TypeError: only 0-dimensional arrays``), read by the next run as results recording no
    config.  Now every value is strict JSON (non-finite floats as ``"nan"`` / ``"inf"`` / ``"-inf"``, as
    ``events.json`` writes them), :func:`load_result` reads them back, and a value that is not JSON is refused
    before the file is touched."""
    C = experiment_script("_common")
    monkeypatch.setenv("QSGD_EXPERIMENT_OUT", str(tmp_path))
    table = [{"t*": float("inf"), "gauge": np.float32("nan"), "edge": -np.inf, "events": np.int64(3), "ok": True}]
    d = C.save("x", {"loss": np.ones(3)}, [], table, {"lr": np.float32(0.5), "curve": np.array([1.0, np.nan])})
    text = (tmp_path / "x" / "result.json").read_text()
    raw = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert raw["table"][0] == {"t*": "inf", "gauge": "nan", "edge": "-inf", "events": 3, "ok": True}
    back = C.load_result(f"{d}/result.json")
    row = back["table"][0]
    assert row["t*"] == np.inf and np.isnan(row["gauge"]) and row["edge"] == -np.inf and row["events"] == 3
    assert back["lr"] == 0.5 and back["curve"][0] == 1.0 and np.isnan(back["curve"][1])
    with pytest.raises(TypeError, match="object"):
        C.save("x", {"loss": np.ones(3)}, [], [{"bad": object()}])
    assert (tmp_path / "x" / "result.json").read_text() == text  # (untouched)


@pytest.mark.slow
@pytest.mark.parametrize("every", [1, 2])
def test_fold_levels_with_coupled_decay_on_a_trained_quadratic(every):
    """The convention the fold levels read, on ``train`` itself: SGD with coupled decay (``add_decayed_weights``
    before ``sgd``, an ``SGDSpec``) and a linear warm-up on ``h/2 |theta|^2``, the fold number recorded every
    ``every`` steps and held between.  The one level-1 event is at the record after the first recorded step
    whose ``eta (h + wd)`` reaches 1."""
    import jax
    import jax.numpy as jnp
    import optax

    from quotient_sgd.optim import SGDSpec, quotient_trajectory, train
    from quotient_sgd.symmetry import Rescale

    h, wd, n = 1.2, 1.0, 24
    sched = optax.linear_schedule(0.0, 0.6, 12)
    group = Rescale(incoming=((("w1",), 1),), outgoing=((("w2",), 0),), name="unit")
    params = {"w1": jnp.ones((1, 1)), "w2": jnp.ones((1, 1)), "v": jnp.ones(3)}

    def loss_fn(p, batch):
        return 0.5 * h * sum(jnp.sum(x ** 2) for x in jax.tree.leaves(p))

    inner = optax.inject_hyperparams(
        lambda learning_rate: optax.chain(optax.add_decayed_weights(wd), optax.sgd(learning_rate)))(
        learning_rate=sched)
    tx = quotient_trajectory(inner, group, observables=("loss", "fold_number"), every=every,
                             spec=SGDSpec("learning_rate", coupled_weight_decay=wd))
    _, _, traj = train(loss_fn, params, tx, lambda step, key: {}, num_steps=n, key=jax.random.key(0))
    lr = np.array([float(sched(k)) for k in range(n)])
    (ev,) = detect(jax.tree.map(np.asarray, traj), lr=lr, kinds=["fold"], fold_levels=(1.0,), weight_decay=wd)
    first = next(k for k in range(every - 1, n, every) if lr[k] * (h + wd) >= 1 - 1e-6)
    assert ev.step == first + 1 and np.isclose(ev.details["level"], 1 - lr[first] * wd, rtol=1e-5)


def test_shock_aware_lr_is_differentiable_in_float32():
    """``jax.grad`` of a float32 run through ``shock_aware_lr`` (with respect to ``fold_target`` or the learning
    rate) was NaN from the third step on: the unselected shock scale ``target / max(0, 1e-30)`` has the derivative
    ``target / 1e-60``, which overflows in float32 (``0 * inf``; float64 was fine), and ``sqrt(0)`` of a zero update
    (a warm-up from a learning rate of 0) the same.  Now both are taken where they are finite: the gradient is
    finite and agrees with central differences."""
    import jax
    import jax.numpy as jnp
    import optax

    from quotient_sgd.diagnostics import shock_aware_lr

    curv = jnp.array([3.0, 1.0])

    def run(ft, lr, policy):
        tx = shock_aware_lr(optax.sgd(lr), fold_target=ft, policy=policy, max_scale=2.0 if policy == "track" else 1.0)
        p = jnp.array([1.0, 1.0])
        s = tx.init(p)
        for _ in range(4):
            u, s = tx.update(curv * p, s, p)
            p = p + u
        return 0.5 * jnp.sum(curv * p ** 2)

    value = jax.jit(run, static_argnums=2)
    g = jax.jit(jax.grad(run, argnums=(0, 1)), static_argnums=2)(1.0, 0.9, "cap")
    eps = 1e-3
    fd = [(value(1.0 + eps, 0.9, "cap") - value(1.0 - eps, 0.9, "cap")) / (2 * eps),
          (value(1.0, 0.9 + eps, "cap") - value(1.0, 0.9 - eps, "cap")) / (2 * eps)]
    for i in (0, 1):
        assert np.isfinite(float(g[i])) and np.isclose(float(g[i]), float(fd[i]), rtol=0.05), (i, g, fd)
    # a warm-up from a learning rate of 0: the first update is zero
    warm = optax.linear_schedule(0.0, 0.9, 2)
    dg = jax.jit(jax.grad(lambda ft: run(ft, warm, "cap")))(1.0)
    assert np.isfinite(float(dg))
