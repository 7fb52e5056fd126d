"""Statements of README.md and experiments/README.md checked against the code: the experiments' stated settings,
the detector settings experiments/README.md says it used, the sampler and its bound, the XLA flag set on import,
the float32 tolerance floor of the HJ engine and the names the experiments README cites.  Nothing here compiles."""

import inspect
import os
import pathlib
import re

import numpy as np
import pytest

from helpers import EXPERIMENTS

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text().replace("\n", " ")
EXP_README = (ROOT / "experiments" / "README.md").read_text().replace("\n", " ")


def _experiment_config(name, scale):
    import sys

    if EXPERIMENTS not in sys.path:
        sys.path.insert(0, EXPERIMENTS)
    import _common

    return _common.load_config(name, [f"scale={scale}"])


def test_experiment_settings_are_the_configs_defaults():
    # experiments/README.md, rows 1-6 and "What the tests assert": the settings each experiment states
    eos = _experiment_config("edge_of_stability", "cpu")
    assert (eos.input_dim, tuple(eos.hidden), eos.num_examples) == (8, (32, 32), 128)  # "8-32-32-1, 128 examples"
    assert eos.eta_lambda0 == 1.4 and eos.hessian_every == 1  # "lr = 1.4 / lambda_step(theta_0)", "every step"
    # "rescale log-factors U(-0.6, 0.6)": group.sample's log-factors are U(-2 scale, 2 scale)
    assert 2 * eos.twin_scale == pytest.approx(0.6)
    assert _experiment_config("edge_of_stability", "test").num_steps == 150  # "the first 150 steps"
    cat = _experiment_config("catapult", "cpu")
    assert (cat.width, cat.num_examples, cat.eta_lambda0, cat.drop_factor) == (512, 64, 3.0, 0.8)
    cat_test = _experiment_config("catapult", "test")
    assert (cat_test.width, cat_test.num_steps) == (256, 80)  # "test_catapult_fast (width 256, 80 steps)"
    grok = _experiment_config("grokking", "cpu")
    assert (grok.num_layers, grok.d_model, grok.num_heads, grok.p, grok.train_fraction) == (1, 64, 4, 23, 0.5)
    assert (grok.lr, grok.weight_decay, grok.num_steps, grok.eval_every) == (1e-3, 1.0, 5000, 50)
    grok_test = _experiment_config("grokking", "test")
    assert (grok_test.lr, grok_test.num_steps) == (3e-3, 1800)  # "scale=test: lr 3e-3, 1800 steps"
    cnn = _experiment_config("normalised_cnn", "cpu")
    assert (tuple(cnn.channels), cnn.norm, cnn.lr, cnn.weight_decay, cnn.batch_size, cnn.num_steps) == (
        (8, 16), "layer", 0.1, 0.01, 128, 3000)
    assert np.sqrt(2 * cnn.lr * cnn.weight_decay) == pytest.approx(0.0447, abs=5e-5)  # "sqrt(2 eta lambda) = 0.0447"
    assert 1 / (2 * cnn.lr * cnn.weight_decay) == pytest.approx(500)  # "time scale 1/(2 eta lambda) = 500"
    assert cnn.spike_smooth == 20  # "3 loss_spikes on the 20-step smoothed mini-batch loss"
    hjs = _experiment_config("hj_slices", "cpu")
    assert tuple(hjs.checkpoints) == (0, 25, 100, 300) and tuple(hjs.extents) == (0.02, 0.1, 0.5)
    assert hjs.flow_time_factor == 2.0 and hjs.nu_rel == 0.01  # "to 2 x the predicted time", "1% of extent^2 / t"
    hjs_test = _experiment_config("hj_slices", "test")  # "an 8-unit MLP on 32 examples, one half-width-0.5 slice at
    assert tuple(hjs_test.extents) == (0.5,) and tuple(hjs_test.checkpoints) == (0, 10)  # GD steps 0 and 10,
    assert hjs_test.n == 41 and {"hidden=[8]", "num_examples=32"} <= set(hjs_test.model)  # 41 grid points"
    slr = _experiment_config("shock_lr", "cpu")
    assert (slr.num_steps, tuple(slr.seeds), slr.eta_lambda0) == (300, (0, 1, 2), 3.0)
    assert (slr.fold_target, slr.init_scale, slr.track_target, slr.max_scale) == (1.8, 0.3, 1.8, 4.0)


def test_experiment_detector_settings_are_the_detectors_defaults():
    # experiments/README.md, "Detector settings used throughout": spike = loss > 2 x its minimum over the previous
    # 50 steps; catapult within 100 steps below 0.8 x; re-arming below 0.9 x the level; CUSUM k = 0.5, clip 4,
    # 10 reference values, alpha 0.05, 4000 Monte-Carlo runs; divergence 100 x for 20 steps
    from quotient_sgd.diagnostics import _cusum, _detect

    def defaults(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}

    spike = defaults(_detect.detect_loss_spike)
    assert (spike["spike_factor"], spike["spike_window"]) == (2.0, 50)
    cat = defaults(_detect.detect_catapult)
    assert (cat["confirm_window"], cat["drop_factor"]) == (100, 0.8)
    assert defaults(_detect.detect_edge_of_stability)["rearm"] == 0.9 == defaults(_detect.detect_fold)["rearm"]
    assert tuple(defaults(_detect.detect_edge_of_stability)["eos_levels"]) == (1.0, 2.0)
    tr = defaults(_detect.detect_transition)
    assert (tr["k"], tr["min_ref"], tr["alpha"]) == (0.5, 10, 0.05)
    thr = defaults(_cusum.cusum_threshold)
    assert (thr["clip"], thr["num_sims"]) == (4.0, 4000)
    div = defaults(_detect.detect_divergence)
    assert (div["divergence_factor"], div["divergence_patience"]) == (100.0, 20)


def test_the_tests_and_helpers_experiments_readme_names_exist():
    import ast

    tree = ast.parse((ROOT / "tests" / "test_diagnostics_experiments.py").read_text())
    tests = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    for name in ("test_edge_of_stability_fast", "test_edge_of_stability_cpu", "test_catapult_fast",
                 "test_catapult_cpu", "test_hj_slices_smoke"):
        assert f"`{name}`" in EXP_README and name in tests, name
    assert "`test_grokking_cpu_*`" in EXP_README and any(t.startswith("test_grokking_cpu_") for t in tests)
    # "experiments/_common.py::_curvature_chunk"
    assert "`experiments/_common.py::_curvature_chunk`" in EXP_README
    common = ast.parse((ROOT / "experiments" / "_common.py").read_text())
    assert "_curvature_chunk" in {n.name for n in common.body if isinstance(n, ast.FunctionDef)}
    for f in ("test_diagnostics_cusum.py", "test_diagnostics_detect.py", "test_diagnostics_edges.py",
              "test_diagnostics_shock_lr.py"):
        assert f"`{f}`" in EXP_README and (ROOT / "tests" / f).is_file(), f
    for name in ("edge_of_stability", "catapult", "grokking", "normalised_cnn", "hj_slices", "shock_lr"):
        assert f"`python experiments/{name}.py`" in EXP_README and (ROOT / "configs" / f"{name}.py").is_file()


def test_the_sampler_and_its_bound_are_as_stated():
    # README: "`sample_indices(..., sampler=)` offers all three"; "within 1e-6 in total variation ... for batches
    # of up to a quarter of the data (`swap_or_not_bound`; its 176 rounds for the 1348 digits)"
    from quotient_sgd import data
    from quotient_sgd.data import _dataset

    assert set(_dataset.SAMPLERS) == {"permutation", "top_k", "swap_or_not"}
    assert "sampler" in inspect.signature(data.sample_indices).parameters
    assert "`swap_or_not_bound`; its 176 rounds for the 1348 digits" in README
    assert data.swap_or_not_rounds(1348) == 176
    assert data.swap_or_not_bound(1348, 1348 // 4, 176) <= 1e-6
    assert "8x8 images" in README
    ds = data.digits(seed=0)
    assert np.shape(ds.x_train) == (1348, 64)


def test_importing_the_package_sets_the_stated_xla_scheduler_flag():
    # README, XLA:CPU: importing quotient_sgd sets the flag in XLA_FLAGS (QSGD_KEEP_XLA_SCHEDULER=1 leaves it)
    import quotient_sgd

    flag = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
    assert f"`{flag}`" in README and quotient_sgd._XLA_FIX == flag
    assert "`QSGD_KEEP_XLA_SCHEDULER=1`" in README
    if os.environ.get("QSGD_KEEP_XLA_SCHEDULER") != "1":
        assert "xla_cpu_enable_concurrency_optimized_scheduler" in os.environ.get("XLA_FLAGS", "")


def test_the_float32_tolerance_floor_is_the_stated_number():
    # README, HJ: "rtol + atol / S < eps / 16 (... 7.45e-9 in float32)"
    assert "7.45e-9 in float32" in README
    assert float(np.finfo(np.float32).eps) / 16 == pytest.approx(7.45e-9, rel=1e-3)


def test_the_research_code_block_is_twenty_lines():
    # README: "## Research code without the CLI (20 lines)"
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Research code without the CLI \((\d+) lines\)\s+```python\n(.*?)```", text, re.S)
    assert block and int(block.group(1)) == len(block.group(2).splitlines())


def test_the_compilation_cache_directory_is_the_stated_one(monkeypatch):
    # README, Compilation cache: ~/.cache/quotient_sgd/jax ($XDG_CACHE_HOME/quotient_sgd/jax for an absolute
    # XDG_CACHE_HOME); QSGD_COMPILATION_CACHE=DIR moves it, =off turns it off
    from quotient_sgd import cli

    for name in ("QSGD_COMPILATION_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    assert cli.compilation_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "quotient_sgd", "jax")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert cli.compilation_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "quotient_sgd", "jax")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert cli.compilation_cache_dir() == os.path.join("/xdg", "quotient_sgd", "jax")
    monkeypatch.setenv("QSGD_COMPILATION_CACHE", "/elsewhere")
    assert cli.compilation_cache_dir() == "/elsewhere"
    monkeypatch.setenv("QSGD_COMPILATION_CACHE", "off")
    assert cli.compilation_cache_dir() is None
    assert "`~/.cache/quotient_sgd/jax` (`$XDG_CACHE_HOME/quotient_sgd/jax` for an absolute `XDG_CACHE_HOME`" in README


def test_the_install_extras_and_the_command_are_declared():
    # README: `".[cuda]"` / `".[tpu]"` (JAX's own extras), `".[tensorboard]"` (TensorBoard event files),
    # `".[bench]"` (exponax for benchmarks/hj.py), `".[test]"`; the `quotient-sgd` command
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for name in ("cuda", "tpu", "tensorboard", "bench", "test"):
        assert f'".[{name}]"' in README, name
    assert any(d.startswith("jax[cuda") for d in extras["cuda"]) and any(d.startswith("jax[tpu") for d in extras["tpu"])
    assert any(d.startswith("tensorboardX") for d in extras["tensorboard"])
    assert any(d.startswith("exponax") for d in extras["bench"])
    assert {"pytest", "pytest-xdist"} <= {re.split(r"[<>=\[]", d)[0] for d in extras["test"]}
    assert project["scripts"]["quotient-sgd"] == "quotient_sgd.cli:main"


def test_the_hj_thresholds_are_the_stated_numbers():
    # README, HJ: Monte Carlo "`inf` and `reliable=False` below an effective sample size of 20"; a fixed Tsit5 step
    # refused beyond "`dt nu max|eig(Lap)| > 3.51`"; "rtol + atol / S < eps / 16"; a value field "not periodic on a
    # periodic grid (a step across the seam above 4 x its largest step inside)"
    import diffrax

    from quotient_sgd.hj import _cole_hopf, _solve

    assert "below an effective sample size of 20" in README and _cole_hopf.MC_MIN_ESS == 20
    assert "`dt nu max|eig(Lap)| > 3.51`" in README
    assert round(_solve._real_axis_stability(diffrax.Tsit5()), 2) == 3.51
    assert "`rtol + atol / S < eps / 16`" in README and _solve.TOLERANCE_FLOOR_EPS == 1 / 16
    assert "above 4 x its largest step inside" in README and _solve._SEAM_RATIO == 4


def test_the_detector_constants_are_the_stated_numbers():
    # README, detector table: catapult's noise "measured on the series' first 32 records, and a series of fewer
    # than 8 records confirms none"; Adam's edge "read once Adam's bias correction has settled (b1^(k+1) <= 0.05"
    from quotient_sgd.diagnostics import _detect

    assert "on the series' first 32 records, and a series of fewer than 8 records confirms none" in README
    assert (_detect._CATAPULT_NOISE_RECORDS, _detect._CATAPULT_NOISE_MIN) == (32, 8)
    assert "`b1^(k+1) <= 0.05`" in README and _detect._ADAM_SETTLED == 0.05


def test_train_hands_each_update_the_extra_arguments_it_names():
    # README: train hands the update `value`, `grad`, `value_fn`, `obj_fn` and `loss_fn`, "each to an update that
    # takes `**kwargs` or names it: `optax.contrib.sam`, whose update names `grad_fn` alone, gets none"
    import optax

    from quotient_sgd.optim._train import accepted_extra_args

    extra = {"value": 1.0, "grad": 2.0, "value_fn": abs, "obj_fn": abs, "loss_fn": abs}
    assert "`value`, `grad`, `value_fn`, `obj_fn` and `loss_fn`" in README
    assert accepted_extra_args(optax.contrib.sam(optax.sgd(0.1), optax.sgd(0.1)).update, extra) == {}
    assert accepted_extra_args(lambda u, s, p=None, **kw: (u, s), extra) == extra
    assert accepted_extra_args(lambda u, s, p=None, *, value=None: (u, s), extra) == {"value": 1.0}


def test_horizontal_mode_needs_a_continuous_component():
    """README's example of a model with no continuous component for ``symmetry.mode='horizontal'`` is a tanh MLP
    regressor: a tanh classifier keeps its logit translation, which is accepted."""
    from quotient_sgd import config
    assert "(e.g. a tanh MLP regressor; a tanh classifier keeps its logit translation)" in README
    c = config.default_config()
    c.model.activation = "tanh"
    c.symmetry.mode = "horizontal"
    config.validate(c, check_memory=False)
    c.data.name = "teacher_student"
    with pytest.raises(config.ConfigError, match="symmetry.mode"):
        config.validate(c, check_memory=False)
