"""Names, files, defaults, constants and formulas that README.md states, checked against the code."""

import inspect
import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_repository_path_the_readme_names_exists():
    # configs/..., benchmarks/..., experiments/..., tests/..., quotient_sgd/... (templates like configs/<name>.py
    # aside) and the CI script
    paths = set(re.findall(r"\b((?:configs|benchmarks|experiments|tests|quotient_sgd)/[\w./]*\w\.(?:py|md))", README))
    assert {"configs/digits_bn_cnn.py", "benchmarks/hj.py", "tests/conftest.py", "quotient_sgd/_reduce.py"} <= paths
    missing = sorted(p for p in paths if not (ROOT / p).is_file())
    assert not missing, missing
    assert (ROOT / ".ci" / "run").is_file()


def test_the_ci_script_runs_the_readme_test_command():
    # README: "`.ci/run` runs exactly this" (the second command of the first code block)
    command = 'python3 -m pip install -e ".[test]" && python3 -m pytest -q -n 2 -m "not slow"'
    assert command in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[test]" && python3 -m pytest -q -n 2 -m "not slow"' in ci


def test_the_package_map_lists_the_package_directories():
    for name in ("symmetry", "models", "observables", "optim", "hj", "diagnostics", "data", "config", "runner"):
        assert re.search(rf"^      {name}/ ", README, re.M), name
        assert (ROOT / "quotient_sgd" / name / "__init__.py").is_file(), name
    assert (ROOT / "quotient_sgd" / "cli.py").is_file()
    for bench in ("symmetry.py", "trajectory.py", "hj.py", "sweep.py"):
        assert (ROOT / "benchmarks" / bench).is_file()


#: module -> the public names README.md uses from it
NAMES = {
    "quotient_sgd.symmetry": "verify align quotient_distance Rescale Scale Translation GL Permutation Product",
    "quotient_sgd.observables": "KINDS kind_of predict_charge_drift lanczos_extremes",
    "quotient_sgd.optim": ("SGDSpec quotient_trajectory train set_hyperparams member_axes gauge_fix horizontal "
                           "adam_preconditioner"),
    "quotient_sgd.diagnostics": ("adam_edge stability_edge fold_edge fold_levels_for detect LiveDetector detect_run "
                                 "shock_aware_lr stability_decomposition Event"),
    "quotient_sgd.hj": ("Grid Grid2D solve_burgers solve_hj cole_hopf cole_hopf_gradient shock_time find_shocks "
                        "loss_slice slice_flow Spectral ETDRK4"),
    "quotient_sgd.data": "digits batch_fn swap_or_not swap_or_not_bound sample_indices",
    "quotient_sgd.models": "MLP DeepLinear CNN Transformer MeanField LayerNorm BatchNorm",
    "quotient_sgd.runner": "build load_trajectory",
    "quotient_sgd.config": "validate default_config load_config",
}


@pytest.mark.parametrize("module", sorted(NAMES))
def test_the_names_the_readme_uses_exist(module):
    import importlib

    mod = importlib.import_module(module)
    missing = [n for n in NAMES[module].split() if not hasattr(mod, n)]
    assert not missing, missing


def _defaults(fn):
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def test_the_keywords_and_defaults_the_readme_states():
    from quotient_sgd import diagnostics, hj, observables, optim, symmetry

    qt = _defaults(optim.quotient_trajectory)
    assert qt["curvature_batch"] == "next" and qt["every"] == 1
    assert {"hessian_every", "spec", "hessian_at", "preconditioner"} <= set(qt)
    tr = _defaults(optim.train)
    assert tr["donate"] is True and {"key", "opt_state", "model_state", "act_on_model_state", "has_aux"} <= set(tr)
    assert "every" in _defaults(optim.gauge_fix) and "decay_mask" in _defaults(optim.SGDSpec)
    assert "reortho" in _defaults(observables.lanczos_extremes)
    assert _defaults(symmetry.Product)["dense_max"] == 64
    assert _defaults(symmetry.quotient_distance)["canonical"] is False
    assert _defaults(hj.Grid)["periodic"] is True
    for solve in (hj.solve_burgers, hj.solve_hj):
        assert {"dt", "rtol", "atol", "adjoint", "solver", "scheme"} <= set(_defaults(solve))
    assert _defaults(hj.slice_flow)["orthonormalize"] is False
    sal = _defaults(diagnostics.shock_aware_lr)
    assert sal["fold_target"] == 1.8 and sal["policy"] == "cap"
    assert {"lr", "path"} <= set(_defaults(diagnostics.LiveDetector))


def test_the_detector_defaults_the_readme_states():
    from quotient_sgd.diagnostics import _detect

    assert _defaults(_detect.detect_catapult)["drop_factor"] == 0.8  # "below drop_factor (0.8) x"
    assert _defaults(_detect.detect_loss_spike)["spike_factor"] == 2.0  # "loss > 2 x its recent minimum"
    div = _defaults(_detect.detect_divergence)
    assert div["divergence_factor"] == 100.0 and div["divergence_patience"] == 20  # "100 x initial for 20 steps"
    tr = _defaults(_detect.detect_transition)
    assert tr["trend_floor"] == 3 and tr["rate_floor"] == 0.1  # "(trend_floor, default 3)", "(rate_floor, default 0.1)"


def test_the_edges_the_readme_states():
    from quotient_sgd.diagnostics import adam_edge

    assert adam_edge(0.9) == pytest.approx(38.0)  # "38 for b1 = 0.9"
    assert adam_edge(0.9, decay=0.1) == pytest.approx((2 - 0.1) * 1.9 / 0.1)
    assert adam_edge(0.9, nesterov=True) == pytest.approx(38.0 / 2.8)  # "divides it by 1 + 2 b1"
    # "read once Adam's bias correction has settled (b1^(k+1) <= 0.05: from step 28 for b1 = 0.9)"
    assert min(k for k in range(100) if 0.9 ** (k + 1) <= 0.05) == 28


def test_the_config_sections_and_sweep_axes_the_readme_lists():
    from quotient_sgd import config

    cfg = config.default_config()
    sections = {"model", "data", "optim", "symmetry", "observables", "logging", "checkpoint", "sweep"}
    assert set(cfg.keys()) == sections | {"name", "steps", "seed", "init_gauge"}
    assert set(config.SWEEP_AXES) == {"seed", "lr", "batch_size", "weight_decay", "momentum", "init_gauge"}
    assert cfg.sweep.mode == "product" and cfg.observables.curvature_batch == "next"
    bad = config.default_config()
    bad.sweep.mode = "grid"
    with pytest.raises(config.ConfigError, match="product.*zip"):
        config.validate(bad, check_memory=False)


def test_the_embedded_default_is_the_quickstart_config_the_readme_describes():
    # "runs the embedded default config (an MLP on scikit-learn's digits ...), writing runs/quickstart/"; Measured
    # status: 600 steps of a 64-32-10 MLP, observables every K = 10 steps, Hessian extremes every 100
    from quotient_sgd.config import load_config, quickstart_path

    cfg = load_config(quickstart_path())
    assert cfg.name == "quickstart" and cfg.model.name == "mlp" and tuple(cfg.model.hidden) == (32,)
    assert cfg.data.name == "digits" and cfg.steps == 600
    assert cfg.observables.every == 10 and cfg.observables.hessian_every == 100
    assert (ROOT / "configs" / "quickstart.py").is_file()


def test_the_allocator_and_cache_settings_are_the_readme_values():
    from quotient_sgd import cli

    stated = dict(re.findall(r"(MALLOC_\w+_)=(\d+)", README))
    assert stated == cli.MALLOC_SETTINGS
    for name in ("QSGD_NO_MALLOC_TUNING", "QSGD_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR"):
        assert name in README and name in cli.HELP


def test_the_help_names_every_option_the_readme_names():
    from quotient_sgd import cli

    for option in ("--config=", "--config.", "--workdir=", "--coordinator_address=", "--num_processes=",
                   "--process_id=", "--distributed", "--version", "--help"):
        assert option in README and option in cli.HELP, option
    for sub in ("run", "sweep", "report"):
        assert f"quotient-sgd {sub}" in cli.HELP and f"## `quotient-sgd {sub}`" in README


def test_the_grokking_lead_before_the_floors_is_the_one_experiments_readme_measured():
    """README gave the lead of the grokking change points before the ``transition`` detector's floors as 2250-2750
    steps; experiments/README.md measured 2250-2500 (seed 0: 3450 - 950, seed 1: 3100 - 850)."""
    experiments = (ROOT / "experiments" / "README.md").read_text().replace("\n", " ")
    assert "come 2250-2500 steps" in experiments
    assert "(2250-2500 before the `transition` detector's trend and rate floors)" in README.replace("\n", " ")


def test_the_vo_charge_row_includes_the_value_bias(x64):
    """README's charge table gave the VO charge as W_V^T W_V - W_O W_O^T, but the charges of a Transformer with value
    biases are [W_V; b_V]^T [W_V; b_V] - W_O W_O^T (0.01 away from the formula without the bias row at parameters
    shifted by 0.1); the table names the bias row, and the charges are that formula, per head, to rounding."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from quotient_sgd import models

    assert "[W_V; b_V]ᵀ[W_V; b_V] − W_O W_Oᵀ" in README
    model = models.Transformer(8, 4, 2, 1, 4, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    _, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(lambda x: x + 0.1, params)
    q = model.symmetries().charges(params)["vo/blocks.0"]
    a = nnx.to_pure_dict(params)["blocks"][0]["attn"]
    L = jnp.concatenate([a["w_v"], a["b_v"][:, None, :]], axis=1)  # (heads, d_model + 1, d_head)
    want = jnp.einsum("hia,hib->hab", L, L) - jnp.einsum("hai,hbi->hab", a["w_o"], a["w_o"])
    np.testing.assert_allclose(q, want, rtol=0, atol=1e-12)
