"""Experiment scripts: the wall times their tables report, and their inputs at the edges of the allowed ranges."""

import functools
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import EXPERIMENTS

sys.path.insert(0, EXPERIMENTS)


@pytest.mark.parametrize("observables", ["curvature", None])
def test_recorded_wall_time_holds_no_compilation(observables, monkeypatch):
    """``_common.record`` timed each chunk's call, and the first call of each chunk length compiled it: experiment
    1's balanced run reported ``wall_s`` 0.66 s against 0.012 s for its re-gauged twin (which reuses the
    compilation), 2.07 s against 0.006 s with ``hessian_every=7``.  The clock here counts compilations (JAX's own
    compile events), so the recorded seconds are the compilations inside the timed calls: none.  The trajectory
    is still plain gradient descent's, computed here step by step."""
    import _common as C
    from quotient_sgd.models import MLP

    compiles = [0]

    def on_event(name, *args, **kwargs):
        if name.endswith("backend_compile_duration"):
            compiles[0] += 1

    def loss_fn(graphdef, params, batch):  # a function of this test: its chunks are compiled here, not cached
        x, y = batch
        return 0.5 * jnp.mean(jnp.square(nnx.merge(graphdef, params)(x) - y))

    graphdef, params, group = C.split_model(MLP(3, (4,), 1, activation="tanh", rngs=nnx.Rngs(0)))
    batch = (jax.random.normal(jax.random.key(1), (8, 3)), jax.random.normal(jax.random.key(2), (8, 1)))
    loss = functools.partial(loss_fn, graphdef)
    lr = 0.05
    monkeypatch.setattr(C, "time", types.SimpleNamespace(perf_counter=lambda: float(compiles[0])))
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        _, traj, wall = C.record(loss, params, optax.sgd(lr), group, batch, 4, hessian_every=2,
                                 decomposition=False, observables=observables)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert compiles[0] >= 1, compiles  # the chunk of 2 steps was compiled in this call
    assert wall == 0.0, f"{wall} compilations timed as training"

    p, want = params, []
    for _ in range(4):
        value, g = jax.value_and_grad(loss)(p, batch)
        want.append(float(value))
        p = jax.tree.map(lambda a, b: a - lr * b, p, g)
    np.testing.assert_allclose(traj["loss"], want, rtol=1e-5)


def _cells(line):
    """The cells of a Markdown table row as GitHub reads them: split at each ``|`` not escaped as ``\\|``."""
    inner = line.strip()[1:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def test_result_md_keeps_every_number_under_its_own_column():
    """``result.md`` wrote the column names ``|w|^2 start`` / ``|w|^2 end`` (experiment 4) and ``shock number
    lr*|lambda_min|`` (experiment 5) as they are: each ``|`` split a name into more cells, so the header row had
    more cells than the delimiter row (no table at all) and, read cell by cell, the numbers stood under other
    columns' names.  Every row now has one cell per column, each holding its own column's value."""
    import _common as C

    rows = [{"block": "conv0", "|w|^2 start": 11.0, "|w|^2 end": 18.5, "note": "a|b"},
            {"block": "conv1", "|w|^2 start": 16.25, "shock number lr*|lambda_min|": 0.5}]
    lines = C.markdown_table(rows).strip().split("\n")
    header, delim, body = _cells(lines[0]), _cells(lines[1]), [_cells(line) for line in lines[2:]]
    cols = ["block", "|w|^2 start", "|w|^2 end", "note", "shock number lr*|lambda_min|"]
    assert header == cols, header
    assert len(delim) == len(cols) and all(set(c) == {"-"} for c in delim), lines[1]
    assert len(body) == len(rows)
    for row, cells in zip(rows, body):
        assert len(cells) == len(cols), cells
        for col, text in zip(cols, cells):
            v = row.get(col, "")
            assert (float(text) == v) if isinstance(v, float) else (text == v), (col, text, v)


def test_edge_of_stability_refuses_a_twin_that_is_not_the_initial_function(tmp_path, monkeypatch):
    """``twin_scale=40`` (allowed: any finite number >= 0) drew rescale factors up to ``exp(80)``: every float32
    parameter of the re-gauged twin was inf or NaN, and the table reported the twin as a run that "diverged at" step
    0.  The script now stops before training, naming ``twin_scale``; a twin within the precision is the initial
    function (its outputs on the data agree with the balanced network's), and is kept."""
    import _common as C
    from helpers import experiment_script, never_run

    E = experiment_script("edge_of_stability")
    small = ["scale=test", "hidden=[4, 4]", "num_examples=8", "input_dim=3"]
    graphdef, params, twin, _, (x, _) = E.setup(C.load_config("edge_of_stability", [*small, "twin_scale=2"]))
    f0, f1 = nnx.merge(graphdef, params)(x), nnx.merge(graphdef, twin)(x)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(twin)))
    assert moved > 1.0 and float(jnp.max(jnp.abs(f1 - f0))) < 1e-4 * (1 + float(jnp.max(jnp.abs(f0))))

    monkeypatch.setenv("QSGD_EXPERIMENT_OUT", str(tmp_path))
    monkeypatch.setattr(C, "record", never_run)
    with pytest.raises(SystemExit) as err:
        E.main([*small, "twin_scale=40"])
    msg = str(err.value.code)
    assert msg.startswith("edge_of_stability: twin_scale=40.0") and "not finite" in msg, msg
    assert not (tmp_path / "edge_of_stability" / "result.json").exists()


def test_shock_lr_help_shows_the_problem_keys_it_refuses_as_such(capsys):
    """``experiments/shock_lr.py --help`` listed ``problem.seed=0 (an integer in [0, 2147483647])``,
    ``problem.eta_lambda0``, ``problem.num_steps`` ... among the keys to set, with their ranges, while setting any of
    them stops the script (the experiment reads its own ``seeds``, ``eta_lambda0``, ``num_steps``).  Every key the
    script refuses is shown as refused, naming what to set instead; the keys it reads keep their ranges."""
    import _common as C
    from helpers import experiment_script

    E = experiment_script("shock_lr")
    with pytest.raises(SystemExit) as err:
        E.main(["--help"])
    assert err.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for key, instead in E.UNREAD_PROBLEM_KEYS.items():
        line = next(ln for ln in lines if ln.startswith(f"  problem.{key}="))
        assert "refused" in line and instead in line and C.VALUE_RULES[key][1] not in line, line
        with pytest.raises(SystemExit, match=f"problem.{key}="):
            E.check_overrides({f"problem.{key}": "1"})
    line = next(ln for ln in lines if ln.startswith("  problem.width="))
    assert "refused" not in line and C.VALUE_RULES["width"][1] in line, line


def test_grokking_trajectory_keeps_the_per_step_gradient_norm(monkeypatch):
    """Experiment 3 renamed its evaluations' ``q/grad_norm`` to ``grad_norm`` over the recorder's per-step raw
    gradient norm: ``trajectory.npz`` held it at the evaluated steps alone (3 finite values of 60 with
    ``eval_every=20``), NaN at every other step it had been measured at.  The trajectory keeps the per-step norm;
    the change points still read the evaluations' copy, at the evaluated steps (the recorder's output stands in
    here: what is checked is what the script makes of it)."""
    import _common as C
    from helpers import experiment_script

    G = experiment_script("grokking")
    n, every = 12, 5
    steps = np.arange(n)
    refresh = steps % every == 0
    per_step = 1.0 + 0.1 * steps  # the recorder's per-step raw gradient norm
    sampled = np.where(refresh, 2.0 + steps, np.nan)  # the evaluations' copy (distinct values, to tell them apart)
    traj = {"loss": np.linspace(2.0, 1.0, n), "grad_norm": per_step, "step": steps,
            "hessian_step": np.where(refresh, steps, -1), "q/grad_norm": sampled,
            "q/grad_norm_canonical": np.where(refresh, 0.5, np.nan), "test_accuracy": np.where(refresh, 0.5, np.nan)}
    monkeypatch.setattr(C, "record", lambda *a, **k: (None, {kk: v.copy() for kk, v in traj.items()}, 0.0))
    monkeypatch.setattr(G, "detect", lambda *a, **k: [])  # (the change points are not what is checked here)
    cfg = C.load_config("grokking", ["scale=test", f"num_steps={n}", f"eval_every={every}", "d_model=4",
                                     "num_heads=1", "p=3"])
    out = G.run(cfg)
    np.testing.assert_array_equal(out["traj"]["grad_norm"], per_step)
    assert "q/grad_norm" not in out["traj"] and "grad_norm_canonical" in out["traj"], sorted(out["traj"])
    np.testing.assert_array_equal(out["sub"]["step"], steps[refresh])
    np.testing.assert_array_equal(out["sub"]["grad_norm"], sampled[refresh])
    np.testing.assert_array_equal(out["sub"]["grad_norm_canonical"], [0.5] * 3)


def test_hj_slices_scale_sizes_the_sliced_mlp(tmp_path, monkeypatch):
    """Experiment 5 built experiment 1's config at the CPU scale whatever its own: ``scale=paper`` (checkpoints up to
    experiment 1's paper step count, 5000) sliced the CPU-sized MLP (8-32-32-1 on 128 examples), and experiment 1's
    paper sizes were reachable only through ``model=["scale=paper"]``, against the rule that a nested config's scale
    is the script's.  The MLP now follows ``scale`` (its ``model`` overrides still applied on top), and a scale in
    ``model`` is refused by name before anything is computed."""
    import _common as C
    from helpers import experiment_script, never_run

    H = experiment_script("hj_slices")
    exp1 = C.config_module("edge_of_stability")
    for scale in C.SCALES:
        want = exp1.get_config(scale)
        cfg = C.load_config("hj_slices", [f"scale={scale}", 'model=["lanczos=7"]', "seed=4"])
        got = H.model_config(cfg)
        for key in ("hidden", "num_examples", "input_dim", "teacher_hidden", "eta_lambda0"):
            assert got[key] == want[key], (scale, key, got[key], want[key])
        assert (got.lanczos, got.seed) == (7, 4), (scale, got.lanczos, got.seed)

    monkeypatch.setenv("QSGD_EXPERIMENT_OUT", str(tmp_path))
    monkeypatch.setattr(H, "run", never_run)
    with pytest.raises(SystemExit) as err:
        H.main(["scale=test", 'model=["scale=paper"]'])
    msg = str(err.value.code)
    assert msg.startswith("hj_slices: model=") and "scale=... of this experiment" in msg, msg
    assert not (tmp_path / "hj_slices" / "result.json").exists()


def test_normalised_cnn_wall_time_holds_no_compilation(monkeypatch):
    """Experiment 4 timed its one training call, whose first call compiles: about 2 s of the 2.8 s reported for a
    200-step run.  The clock here counts compilations (JAX's compile events): none inside the timed call.  The run
    still starts from the initial CNN on the first batch."""
    import _common as C
    from helpers import experiment_script
    from quotient_sgd.data import batch_fn, digits
    from quotient_sgd.models import CNN

    N = experiment_script("normalised_cnn")
    compiles = [0]

    def on_event(name, *args, **kwargs):
        if name.endswith("backend_compile_duration"):
            compiles[0] += 1

    monkeypatch.setattr(N, "time", types.SimpleNamespace(perf_counter=lambda: float(compiles[0])))
    monkeypatch.setattr(N, "detect", lambda *a, **k: [])  # (the events are not what is checked here)
    cfg = C.load_config("normalised_cnn", ["scale=test", "num_steps=3", "channels=[3]", "batch_size=4", "seed=5"])
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        out = N.run(cfg)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert compiles[0] >= 1 and out["wall"] == 0.0, (compiles, out["wall"])

    # the first step's loss is the initial CNN's on the first batch (train's batch key: fold_in(key, step))
    ds = digits(seed=cfg.seed, layout="image")
    graphdef, params, _ = C.split_model(CNN(1, (3,), 10, norm="layer", classifier=True, rngs=nnx.Rngs(cfg.seed)))
    batch = batch_fn(ds, cfg.batch_size)(jnp.int32(0), jax.random.fold_in(jax.random.key(cfg.seed), 0))
    np.testing.assert_allclose(out["traj"]["loss"][0], float(N._xent(graphdef, params, batch)), rtol=1e-5)


def test_recorded_lr_times_sharpness_in_float64(x64):
    """The recorder's ``lr_times_lambda_step`` multiplied the sharpness by a float32 learning rate: with float64
    parameters it was off by 1.5e-8 relative at ``lr = 0.1`` (not a float32 number), and failed under strict dtype
    promotion.  It is now ``lr * lambda_step`` in the parameters' precision, exactly."""
    import _common as C
    from quotient_sgd.models import MLP

    graphdef, params, group = C.split_model(MLP(3, (4,), 1, activation="relu", rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    batch = (jax.random.normal(jax.random.key(1), (8, 3), jnp.float64),
             jax.random.normal(jax.random.key(2), (8, 1), jnp.float64))
    lr = 0.1
    # (what record evaluates before every chunk)
    d = C.decomposition_fn(functools.partial(C.mse, graphdef), batch, group, 3, raw=False)(
        params, jax.random.key(0), lr=lr)
    lam = np.asarray(d["sharpness_horizontal"])
    assert lam.dtype == np.float64 and lam > 0, lam
    assert np.asarray(d["lr_times_lambda_step"]) == lr * lam, (d["lr_times_lambda_step"], lr * lam)
