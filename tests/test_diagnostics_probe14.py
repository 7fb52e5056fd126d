"""The diagnostics and the experiment scripts on cases beyond their tests: overrides the scripts refused only
after computing, :func:`~quotient_sgd.diagnostics.cusum_threshold` at the boundaries of its arguments."""

import importlib.util
import os
import sys

import pytest

EXPERIMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments")
sys.path.insert(0, EXPERIMENTS)


def _script(name):
    """``experiments/<name>.py`` loaded by path under its own module name (``import <name>`` could find the config
    of the same name in configs/)."""
    spec = importlib.util.spec_from_file_location(f"_probe14_script_{name}", os.path.join(EXPERIMENTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _never_run(*args, **kwargs):
    raise AssertionError("the experiment computed with overrides it should have refused")


@pytest.mark.parametrize("value", ["2", "0.0001"])
def test_shock_lr_refuses_an_init_scale_shock_aware_lr_refuses_before_computing(value, tmp_path, monkeypatch):
    """``experiments/shock_lr.py init_scale=2`` passed the config check (any number > 0), trained the constant
    and cosine runs, then stopped in ``shock_aware_lr``'s own ValueError traceback ("cap" never lengthens the
    inner step; below ``min_scale = 0.001`` likewise): the config now refuses it by name before anything runs."""
    E = _script("shock_lr")
    monkeypatch.setenv("QSGD_EXPERIMENT_OUT", str(tmp_path))
    monkeypatch.setattr(E, "run", _never_run)
    with pytest.raises(SystemExit) as err:
        E.main(["scale=test", f"init_scale={value}"])
    msg = str(err.value.code)
    assert "init_scale" in msg and "[0.001, 1]" in msg
    # the bounds themselves are what shock_aware_lr takes under both policies
    import optax

    from quotient_sgd.diagnostics import shock_aware_lr

    for s in (1e-3, 1.0):
        shock_aware_lr(optax.sgd(0.1), policy="cap", init_scale=s)
        shock_aware_lr(optax.sgd(0.1), policy="track", max_scale=4.0, init_scale=s)
