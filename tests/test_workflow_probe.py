"""Research workflows across the package: the experiment scripts' command lines and the pieces a researcher
composes without the CLI."""

import os
import sys

import pytest

from helpers import EXPERIMENTS, experiment_script, never_run

sys.path.insert(0, EXPERIMENTS)


def _refusal(name, argv, tmp_path, monkeypatch):
    """``(script, message)``: ``experiments/<name>.py``'s ``main(argv)`` stopped before computing anything (its
    ``run`` refuses to be called), with outputs under ``tmp_path``."""
    E = experiment_script(name)
    monkeypatch.setenv("QSGD_EXPERIMENT_OUT", str(tmp_path))
    monkeypatch.setattr(E, "run", never_run)
    with pytest.raises(SystemExit) as err:
        E.main(argv)
    return E, str(err.value.code)


@pytest.mark.parametrize("override, named", [
    ('model=["seed=3"]', "seed"),
    ('model=["num_steps=5"]', "checkpoints"),
    ('model=["hidden"]', "key=value"),
    ('model=["hiden=[8]"]', "hidden"),
])
def test_hj_slices_refuses_model_overrides_it_does_not_read(tmp_path, monkeypatch, override, named):
    """Experiment 5's ``model`` overrides of experiment 1's config: ``model=["seed=3"]`` ran seed 0 (the script
    set the MLP's seed from its own ``seed``) and ``num_steps`` / ``hessian_every`` / ``twin_scale`` changed
    nothing, while ``result.json`` recorded them as given; a malformed or unknown override stopped the script only
    after the results directory was claimed, naming experiment 1 and not ``model``.  Each stops ``main`` before
    anything is computed, naming ``model`` and what to set instead."""
    _, msg = _refusal("hj_slices", ["scale=test", override], tmp_path, monkeypatch)
    assert msg.startswith("hj_slices: model=") and named in msg, msg
    assert not os.path.exists(tmp_path / "hj_slices" / "result.json")


def test_hj_slices_model_config_keeps_what_it_reads():
    """The overrides the slices read reach experiment 1's config; the seed is the experiment's own."""
    import _common as C
    E = experiment_script("hj_slices")

    cfg = C.load_config("hj_slices", ["scale=test", "seed=4", 'model=["hidden=[6, 5]", "eta_lambda0=1.1"]'])
    ecfg = E.model_config(cfg)
    assert tuple(ecfg.hidden) == (6, 5) and ecfg.eta_lambda0 == 1.1 and ecfg.seed == 4


@pytest.mark.parametrize("override, instead", [
    ("problem.eta_lambda0=2.0", "eta_lambda0="),
    ("problem.seed=1", "seeds="),
    ("problem.num_steps=40", "num_steps="),
])
def test_shock_lr_refuses_problem_keys_it_does_not_read(tmp_path, monkeypatch, override, instead):
    """Experiment 6 reads the catapult problem's model and data, not its learning rate, seed, step count or
    detector settings: ``problem.eta_lambda0=2.0`` kept the base lr at 3 / lambda0 (and ``problem.seed=1`` ran
    seed 0) while ``result.json`` recorded the override.  Each is refused before anything is computed, naming the
    key of this experiment that sets it; ``problem.width`` (read) still passes the check."""
    E, msg = _refusal("shock_lr", ["scale=test", override], tmp_path, monkeypatch)
    assert msg.startswith(f"shock_lr: {override.split('=')[0]}=") and instead in msg, msg
    with pytest.raises(AssertionError, match="computed"):
        E.main(["scale=test", "problem.width=16", "overwrite=true"])


def test_hj_slices_refuses_a_grid_without_interior_points(tmp_path, monkeypatch):
    """``n=4`` was allowed ("an integer >= 4"), trained the MLP, ran the flow and then failed in NumPy ("zero-size
    array to reduction operation minimum") reading min L'' at the points two or more away from the slice's ends,
    of which 4 points have none.  Refused before anything is computed, naming ``n``; ``n=5`` passes the check."""
    import _common as C
    E = experiment_script("hj_slices")

    monkeypatch.setenv("QSGD_EXPERIMENT_OUT", str(tmp_path))
    monkeypatch.setattr(E, "run", never_run)
    with pytest.raises(SystemExit, match=r"hj_slices: n=4: allowed an integer >= 5"):
        E.main(["scale=test", "n=4"])
    assert C.load_config("hj_slices", ["scale=test", "n=5"]).n == 5


@pytest.mark.parametrize("argv, named", [
    (["--only", "foo"], "--only: invalid choice"),
    (["--steps", "0"], "--steps: '0': allowed an integer >= 1"),
    (["--only", "mlp784", "--cli"], "--cli times the quickstart"),
])
def test_sweep_benchmark_refuses_options_it_would_not_measure(capsys, argv, named):
    """``benchmarks/sweep.py --only foo`` measured nothing and exited with status 0; ``--steps 0`` ended in the
    config validation's traceback naming ``config.steps``; ``--cli --only mlp784`` skipped the command-line timing
    without a word.  Each exits with status 2 before anything is measured, naming the option."""
    import importlib.util

    path = os.path.join(EXPERIMENTS, "..", "benchmarks", "sweep.py")
    spec = importlib.util.spec_from_file_location("qsgd_benchmarks_sweep", path)
    B = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(B)
    with pytest.raises(SystemExit) as err:
        B.main(argv)
    assert err.value.code == 2 and named in capsys.readouterr().err


def test_edge_of_stability_events_name_their_run(tmp_path):
    """Experiment 1 wrote the balanced run's and the re-gauged twin's events into one ``events.json`` without
    saying which is which: the twin's edge at step 6 read as an event of the balanced run (``trajectory.npz``),
    which re-detected from that trajectory has none there.  Each event now names its run in ``details["run"]``,
    and the label survives the round trip through ``events.json``."""
    E = experiment_script("edge_of_stability")
    from quotient_sgd.diagnostics import Event, load_events, save_events

    ev = lambda step: Event(step, "edge_of_stability", 2.0, {"lr": 0.1}, "step", False, {"level": 2.0})  # noqa: E731
    out = {"runs": {"balanced": {"events": [ev(60)]}, "regauged": {"events": [ev(6), ev(84)]}}}
    save_events(tmp_path / "events.json", E.labelled_events(out))
    back = load_events(tmp_path / "events.json")
    assert [(e.step, e.details["run"], e.details["level"]) for e in back] == [
        (60, "balanced", 2.0), (6, "regauged", 2.0), (84, "regauged", 2.0)]
    assert "run" not in out["runs"]["balanced"]["events"][0].details  # the live events are left as they are


def test_catapult_table_of_a_diverged_run():
    """Experiment 2 at ``eta_lambda0=8`` diverges (loss inf at step 8, NaN after): its table gave
    ``lr*lambda_step end`` = 8.0, the value at step 0 (the last finite refresh), and "missed" for every catapult
    variant, as if the detectors had failed, while ``events.json`` held the divergence.  The end value is now the
    last refresh's (NaN), the divergence step is a column, and the catapult is "none (diverged)"."""
    import numpy as np

    E = experiment_script("catapult")
    from quotient_sgd.diagnostics import Event

    steps = np.arange(12)
    loss = np.array([0.5, 1.0, 20.0, 700.0, 4e4, 3e10, 1e28, np.inf] + [np.nan] * 4)
    refresh = np.where(steps % 4 == 0, steps, -1)
    lam = np.where(steps == 0, 40.0, np.nan)
    traj = {"step": steps, "loss": loss, "hessian_step": refresh, "sharpness_horizontal": lam}
    gt = E.ground_truth(traj, 0.2)
    assert gt["lr*lambda_step start"] == 8.0 and np.isnan(gt["lr*lambda_step end"]) and gt["spiked"]
    div = Event(7, "divergence", np.inf, {"loss": np.inf}, "quotient", True, {})
    [row] = E.summarise({"traj": traj, "lr": 0.2, "lambda0": 40.0, "events": [div], "wall": 0.0})
    assert row["diverged at"] == 7
    assert all(row[f"catapult[{v}] step"] == "none (diverged)" for v in ("quotient", "step", "raw")), row


def test_hj_slices_stops_at_a_diverged_checkpoint():
    """Experiment 5 with ``model=["eta_lambda0=9", ...]``: GD diverged (non-finite loss from step 5) and the slice
    through the NaN parameters failed in ``hj.shock_time``'s traceback ("p0 is not finite"), after the slices
    before it were computed.  The script now stops where the training diverged, naming the step, the learning
    rate and what to change."""
    import _common as C
    E = experiment_script("hj_slices")

    cfg = C.load_config("hj_slices", ["scale=test", "checkpoints=[20]",
                                      'model=["hidden=[4]", "num_examples=8", "lanczos=4", "eta_lambda0=9"]'])
    with pytest.raises(SystemExit, match=r"hj_slices: GD at lr = 9.0 / lambda_step\(theta_0\) = .* diverged at step "
                                         r"\d+ .*before checkpoint 20.*lower eta_lambda0"):
        E.run(cfg)


def test_edge_of_stability_table_reads_every_key_at_the_same_refresh():
    """Experiment 1's table took each Hessian key's finite records separately and indexed them with the steps of
    ``sharpness_horizontal``: one NaN gauge factor (its refresh's sharpness finite) shifted the gauge columns
    against the steps (the "gauge at edge" of another refresh) or failed on mismatched boolean indices.  Every key
    is now read at the same refreshes, and a diverged run names its divergence step."""
    import numpy as np

    E = experiment_script("edge_of_stability")
    from quotient_sgd.diagnostics import Event

    steps = np.arange(8)
    refresh = np.where(steps % 2 == 0, steps, -1)
    lam = np.array([10.0, 10.0, 14.0, 14.0, 20.0, 20.0, 21.0, 21.0])
    gauge = np.array([1.1, 1.1, np.nan, np.nan, 1.3, 1.3, 1.4, 1.4])
    traj = {"step": steps, "hessian_step": refresh, "loss": np.linspace(1.0, 0.5, 8), "sharpness_horizontal": lam,
            "sharpness_quotient": lam / 1.2, "sharpness_raw": lam, "gauge_factor": gauge,
            "gauge_factor_charges": gauge}
    edge = Event(4, "edge_of_stability", 2.0, {"lr": 0.1}, "step", False, {"level": 2.0})
    div = Event(6, "divergence", 1e3, {"loss": 1e3}, "quotient", True, {})
    out = {"lr": 0.1, "runs": {"balanced": {"traj": traj, "events": [edge, div], "wall": 0.0}}}
    [row] = E.summarise(out)
    assert row["gauge at edge"] == 1.3 and row["gauge_charges at edge"] == 1.3, row
    assert row["lambda_canonical at edge"] == 20.0 / 1.2 and row["diverged at"] == 6


def test_grokking_refuses_a_transformer_of_two_features(tmp_path, monkeypatch):
    """``d_model=2 num_heads=1`` passed the experiment's check ("an integer >= 2") and ended in the Transformer's
    ``ValueError`` traceback (``d_model must be >= 3``, as README states for a config).  Refused now with the
    key, the value and what is allowed; ``d_model=3`` passes."""
    import _common as C
    E = experiment_script("grokking")

    monkeypatch.setenv("QSGD_EXPERIMENT_OUT", str(tmp_path))
    monkeypatch.setattr(E, "run", never_run)
    with pytest.raises(SystemExit, match=r"grokking: d_model=2: allowed an integer >= 3"):
        E.main(["scale=test", "d_model=2", "num_heads=1"])
    assert C.load_config("grokking", ["scale=test", "d_model=3", "num_heads=1"]).d_model == 3
