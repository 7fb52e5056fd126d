"""Experiment scripts: the slice's L''(0) on a grid without a point at 0, the catapult control run once, extents
given twice, and result.json written last (a run stopped while saving leaves none of another run)."""

import json
import sys
import types

import numpy as np
import pytest

from helpers import EXPERIMENTS, experiment_script, never_run

sys.path.insert(0, EXPERIMENTS)


def _cubic_loss(params, batch):
    a = params["w"][0]
    return -(a**3) + batch * a**2


def test_hj_slices_second_derivative_at_zero_on_a_grid_of_even_size(x64, monkeypatch):
    """Experiment 5's ``L''(0) on slice`` was np.gradient's value at the grid point ``n // 2``, which is the slice's
    centre a = 0 only for an odd ``n``: for an even ``n`` (allowed: ``n >= 5``) it is ``dx / 2``, and on
    ``L = -a^3 + 0.75 a^2`` (``L''(a) = 1.5 - 6 a``) on ``[-0.5, 0.5]`` the table gave 0.90 at ``n = 6`` and 1.42 at
    ``n = 40`` for ``L''(0) = 1.5``.  The centred difference of the slope about 0 is exact for a quadratic slope."""
    import jax.numpy as jnp

    E = experiment_script("hj_slices")
    monkeypatch.setattr(E.hj, "slice_flow", never_run)  # (the flow's row entries are not checked here)
    pc = {"w": jnp.zeros(2, jnp.float32)}
    d = {"w": jnp.asarray([1.0, 0.0], jnp.float32)}
    c = 0.75
    for n in (6,):
        cfg = types.SimpleNamespace(n=n, flow_time_factor=2.0, nu_rel=1e-2, max_steps=100)
        row = E._one_slice(cfg, _cubic_loss, jnp.asarray(c, jnp.float32), pc, d, 0.5, 0, -1.0, 1.0, 0.1, [])
        assert abs(row["L''(0) on slice"] - 2 * c) < 1e-9, (n, row)
        # min L'' = 1.5 - 6 a over the points two or more from the ends: at a = 0.5 - 2 dx (exact there too)
        dx = 1.0 / (n - 1)
        assert abs(row["min L'' on slice"] - (2 * c - 6 * (0.5 - 2 * dx))) < 1e-9, (n, row)


def _fake_catapult(monkeypatch, C, E):
    """The catapult script with its model, training and figure replaced by a fixed trajectory (a catapult: a loss
    spike, then the sharpness falls); returns the list of the learning rates ``record`` was called with."""
    n = 40
    steps = np.arange(n)
    loss = np.linspace(1.0, 0.5, n)
    loss[10:13] = [5.0, 3.0, 1.2]
    refresh = np.where(steps % 4 == 0, steps, -1)
    lam = np.where(refresh >= 0, np.where(steps < 12, 30.0, 10.0), np.nan)
    traj = {"step": steps, "hessian_step": refresh, "loss": loss, "sharpness_horizontal": lam,
            "sharpness_quotient": lam, "sharpness_raw": lam}
    calls = []

    def record(*a, lr, **k):
        calls.append(lr)
        return None, {kk: v.copy() for kk, v in traj.items()}, 0.0

    monkeypatch.setattr(E, "setup", lambda cfg: (None, None, None, None, None, 30.0))
    monkeypatch.setattr(C, "record", record)
    return calls


def test_catapult_runs_its_control_setting_once_when_it_is_the_setting_asked_for(tmp_path, monkeypatch):
    """``catapult.py eta_lambda0=1.5`` (the control's own setting) trained the control twice, the second run
    replacing the first in the table: each distinct setting is now trained once, one row each."""
    import _common as C

    E = experiment_script("catapult")
    monkeypatch.setenv("QSGD_EXPERIMENT_OUT", str(tmp_path))
    monkeypatch.setattr(C, "_LOADED", {})
    monkeypatch.setattr(E, "figure", lambda outs, path: open(path, "w").close())
    calls = _fake_catapult(monkeypatch, C, E)
    for eta, settings in ((1.5, [1.5]), (3.0, [1.5, 3.0])):
        calls.clear()
        E.main(["scale=test", f"eta_lambda0={eta}", "overwrite=true"])
        np.testing.assert_allclose(calls, [s / 30.0 for s in settings], rtol=1e-12)
        assert (tmp_path / "catapult" / "trajectory_control.npz").is_file()
        table = C.load_result(str(tmp_path / "catapult" / "result.json"))["table"]
        assert [r["setting"] for r in table] == [f"eta*lambda0={s}" for s in settings], table


def test_hj_slices_refuses_a_half_width_given_twice(tmp_path, monkeypatch):
    """``extents=[0.1, 0.1]`` sliced and flowed the same slices twice, tabulated them twice and wrote each slice
    shock twice to events.json; it is refused by name before anything is computed, as a seed given twice is."""
    E = experiment_script("hj_slices")
    monkeypatch.setenv("QSGD_EXPERIMENT_OUT", str(tmp_path))
    monkeypatch.setattr(E, "run", never_run)
    with pytest.raises(SystemExit, match=r"extents=\[0\.1, 0\.1\]: allowed a non-empty list of distinct"):
        E.main(["scale=test", "extents=[0.1, 0.1]"])
    assert not (tmp_path / "hj_slices" / "result.json").exists()


def test_a_run_stopped_while_saving_leaves_no_result_json_of_another_run(tmp_path, monkeypatch):
    """``result.json`` names the config of the files beside it.  It was written after ``trajectory.npz`` and
    ``events.json`` and before the figure: a run of seed 2 over seed 1's results (``overwrite=true``) stopped while
    writing its events left seed 1's ``result.json`` beside seed 2's ``trajectory.npz``, and one stopped in its
    figure left seed 2's ``result.json`` beside seed 1's figure.  Now the old ``result.json`` goes first and the new
    one comes last: a stopped save leaves none, and the next run (no ``overwrite`` needed) writes a complete set."""
    import _common as C

    E = experiment_script("catapult")
    monkeypatch.setenv("QSGD_EXPERIMENT_OUT", str(tmp_path))
    monkeypatch.setattr(C, "_LOADED", {})
    _fake_catapult(monkeypatch, C, E)
    d = tmp_path / "catapult"

    def figure(outs, path):
        with open(path, "w") as f:
            f.write(json.dumps(C._LOADED["catapult"]["config"]["seed"]))

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(E, "figure", figure)
    E.main(["scale=test", "seed=1"])
    assert C.load_result(str(d / "result.json"))["config"]["seed"] == 1
    saved_events = C.save_events
    for where in ("events", "figure"):
        with monkeypatch.context() as m:
            if where == "events":
                m.setattr(C, "save_events", interrupt)
            else:
                m.setattr(E, "figure", interrupt)
            with pytest.raises(KeyboardInterrupt):
                E.main(["scale=test", "seed=2", "overwrite=true"])
        assert C.save_events is saved_events
        # no result.json: none of seed 1 beside seed 2's trajectory, none of seed 2 beside seed 1's figure
        assert not (d / "result.json").exists(), (where, C.load_result(str(d / "result.json"))["config"]["seed"])
    E.main(["scale=test", "seed=2"])  # (nothing left to protect: no overwrite=true needed)
    res = C.load_result(str(d / "result.json"))
    assert res["config"]["seed"] == 2 and json.loads((d / "catapult.png").read_text()) == 2
    np.testing.assert_array_equal(np.load(d / "trajectory.npz")["loss"][10:13], [5.0, 3.0, 1.2])


def test_shock_lr_events_json_holds_the_loss_spikes_its_table_counts(tmp_path, monkeypatch):
    """Experiment 6 wrote an empty events.json while its table counted each run's ``loss_spike`` events (one per
    seed for the constant and cosine schedules).  events.json now holds them, each naming its run (``details``
    ``schedule`` and ``seed``), one event for each the table counts, at the step of the loss's spike; the figure's
    title names the base lr that was used."""
    import jax.numpy as jnp

    import _common as C
    from quotient_sgd.diagnostics import load_events

    E = experiment_script("shock_lr")
    monkeypatch.setenv("QSGD_EXPERIMENT_OUT", str(tmp_path))
    monkeypatch.setattr(C, "_LOADED", {})
    monkeypatch.setattr(E.exp2, "setup", lambda pc: (None, None, None, None, None, 30.0))
    titles = []

    def save_figure(fig, path):
        titles.append(fig.axes[0].get_title())
        C.plt().close(fig)

    monkeypatch.setattr(C, "save_figure", save_figure)
    spike_at = {"constant": [12], "cosine": [12, 30], "shock-aware cap": [], "shock-aware track": [25]}

    def train(loss, params, tx, data, *, num_steps, **k):
        # which schedule: the order optimisers() builds them in, two calls (compile, timed) each
        name = list(spike_at)[(len(calls) // 2) % len(spike_at)]
        calls.append(name)
        loss = np.linspace(1.0, 0.2, num_steps)
        for s in spike_at[name]:
            loss[s] = 3.0  # 3 x the minimum of the 50 steps before
        return None, None, {"loss": jnp.asarray(loss, jnp.float32)}

    calls = []
    monkeypatch.setattr(E, "train", train)
    E.main(["scale=test", "seeds=[4, 7]", "num_steps=40", "eta_lambda0=2.5"])
    # (the figure's title named the base lr 3 / lambda0 whatever eta_lambda0 was)
    assert titles == ["catapult setting, base lr = 2.5 / lambda0 (seed 4)"], titles
    d = tmp_path / "shock_lr"
    table = C.load_result(str(d / "result.json"))["table"]
    events = load_events(str(d / "events.json"))
    assert len(table) == 8 and all(e.kind == "loss_spike" for e in events)
    for r in table:
        mine = [e.step for e in events if e.details["schedule"] == r["schedule"] and e.details["seed"] == r["seed"]]
        assert mine == spike_at[r["schedule"]] and r["loss spikes"] == len(mine), (r, mine)
    assert len(events) == sum(r["loss spikes"] for r in table) == 2 * 4


def test_normalised_cnn_end_norm_is_the_norm_after_the_last_step(monkeypatch):
    """Experiment 4's ``|w|^2 end`` was read from the trajectory's last row, which holds the charges before the last
    step: one step short of the end (a 1-step run's "end" was its start).  With training replaced by a map that
    doubles every parameter (the recorded charges those of the start), the scale-invariant blocks' ``|w|^2`` end
    at 4 x their start, the charges being quadratic."""
    import jax
    import jax.numpy as jnp

    import _common as C
    from quotient_sgd import observables as obs

    N = experiment_script("normalised_cnn")
    n = 4

    def train(loss, params, tx, data, *, num_steps, **k):
        q = obs.charges(tx_group[0], params)
        rows = lambda v: jnp.broadcast_to(v, (num_steps, *jnp.shape(v)))  # noqa: E731
        traj = {"loss": jnp.linspace(1.0, 0.5, num_steps), "charges": jax.tree.map(rows, q),
                "angular_update": {kk: jnp.full(num_steps, 0.04) for kk in q if kk.startswith("scale/")}}
        return jax.tree.map(lambda x: 2 * x, params), None, traj

    tx_group = []
    real_split = C.split_model

    def split(model):
        out = real_split(model)
        tx_group.append(out[2])
        return out

    monkeypatch.setattr(N, "train", train)
    monkeypatch.setattr(C, "split_model", split)
    monkeypatch.setattr(N, "detect", lambda *a, **k: [])  # (the events are not what is checked here)
    cfg = C.load_config("normalised_cnn", ["scale=test", "channels=[3]", f"num_steps={n}"])
    out = N.run(cfg)
    rows = N.summarise(cfg, out)
    assert [r["block"] for r in rows] == ["scale/convs.0"]
    for r in rows:
        np.testing.assert_allclose(r["|w|^2 end"], 4 * r["|w|^2 start"], rtol=1e-6)


def test_normalised_cnn_tail_holds_the_fraction_of_the_steps_asked_for():
    """Experiment 4's tail was ``int(n (1 - tail_fraction))`` on: ``10 x (1 - 0.9)`` is 0.99999... in floating point,
    so ``tail_fraction=0.9`` measured 10 of 10 steps (91 of 100), and a tail under one step was empty (a NaN RMS).
    Now the last ``ceil(tail_fraction n)`` steps, at least one; the RMS is checked against the steps counted by
    hand."""
    import _common as C

    N = experiment_script("normalised_cnn")
    for n, f, k in ((10, 0.9, 9), (100, 0.9, 90), (10, 0.25, 3), (40, 1e-17, 1), (40, 1.0, 40)):
        cfg = C.load_config("normalised_cnn", ["scale=test", f"tail_fraction={f!r}"])
        ang = np.arange(1.0, n + 1.0)  # distinct angles: the RMS tells how many of the last steps were read
        (row,) = N.summarise(cfg, {"traj": {"loss": np.ones(n), "angular_update/scale/convs.0": ang}})
        want = np.sqrt(np.mean(np.square(ang[n - k:])))
        assert abs(row["measured RMS angle (tail)"] - want) <= 1e-12 * want, (n, f, k, row)
        assert abs(row["mean angle (tail)"] - np.mean(ang[n - k:])) <= 1e-12 * want, (n, f, k, row)


def test_catapult_events_json_holds_both_settings_events(tmp_path, monkeypatch):
    """Experiment 2's table has a row per setting (the control at 1.5 / lambda0 and the one asked for), each
    counting its events, but events.json held the main setting's alone: the control's loss spikes and catapults
    the table counts were nowhere.  Now every event names its setting (``details["setting"]``), the counts per
    setting are the table's, and the control's trajectory is written beside the main one."""
    import _common as C
    from quotient_sgd.diagnostics import load_events

    E = experiment_script("catapult")
    monkeypatch.setenv("QSGD_EXPERIMENT_OUT", str(tmp_path))
    monkeypatch.setattr(C, "_LOADED", {})
    monkeypatch.setattr(E, "figure", lambda outs, path: open(path, "w").close())
    _fake_catapult(monkeypatch, C, E)
    E.main(["scale=test", "eta_lambda0=2.5"])
    d = tmp_path / "catapult"
    table = C.load_result(str(d / "result.json"))["table"]
    events = load_events(str(d / "events.json"))
    assert [r["setting"] for r in table] == ["eta*lambda0=1.5", "eta*lambda0=2.5"]
    for r in table:
        mine = [e for e in events if e.details["setting"] == r["setting"]]
        assert sum(e.kind == "loss_spike" for e in mine) == r["n loss spikes"] >= 1, (r, mine)
        quotient = [e for e in mine if e.kind == "catapult" and e.variant == "quotient"]
        assert quotient and quotient[0].step == r["catapult[quotient] step"], (r, quotient)
    # the control's trajectory (the same fixed one here) beside the main one
    for f in ("trajectory.npz", "trajectory_control.npz"):
        np.testing.assert_array_equal(np.load(d / f)["loss"][10:13], [5.0, 3.0, 1.2])


@pytest.mark.parametrize("scale", ["cpu", "test", "paper"])
def test_edge_of_stability_samples_both_phases_of_the_period_two_oscillation(scale):
    """Past the edge of stability ``lr * lambda_step`` alternates from step to step.  Experiment 1's paper config
    sampled the Hessian every 20 steps: every refresh on one phase, so a run whose high phase falls on odd steps
    (2.4 on odd steps, 1.7 on even ones from step 300 on) had no level-2 edge at all.  Each scale's interval now
    sees both phases: the edge is found at the first refresh on the high phase."""
    import _common as C
    from quotient_sgd.diagnostics import detect

    cfg = C.load_config("edge_of_stability", [f"scale={scale}"])
    n, k, lr = 1000, cfg.hessian_every, 0.1
    steps = np.arange(n)
    q = np.where(steps < 300, 1.5, np.where(steps % 2, 2.4, 1.7))
    refresh = np.where(steps % k == 0, steps, -1)
    lam = np.where(refresh >= 0, q / lr, np.nan)
    traj = {"step": steps, "hessian_step": refresh, "loss": np.linspace(1.0, 0.5, n), "sharpness_horizontal": lam}
    e = C.first(detect(traj, lr=lr, kinds=["edge_of_stability"]), "edge_of_stability", "step", level=2.0)
    high = [s for s in range(300, n) if s % k == 0 and s % 2 == 1]  # refreshes on the high phase
    assert high and e is not None and e.step == high[0], (scale, k, e)
