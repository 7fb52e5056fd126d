"""Runs and run directories on cases the other runner tests do not cover: the summary of a run whose plots have
panels without data, and re-gauging scales that do not keep the function in float32."""

import os

import numpy as np
import pytest

from quotient_sgd.config import default_config, from_dict
from quotient_sgd.runner import _report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _settings(**observables):
    c = default_config()
    c.steps, c.checkpoint.every = 40, 10
    for k, v in observables.items():
        c.observables[k] = v
    return from_dict(c.to_dict())


def test_summary_names_the_series_and_the_evaluation_a_run_did_not_record(tmp_path):
    """A run that diverged at step 3 (before the end of its first chunk, where it is evaluated), with
    ``observables.hessian_every = 0`` and a charge drift that is NaN at every recorded step: its plots show
    placeholders ("not recorded", "no finite value"), but ``summary.md`` said nothing of them (no evaluation line
    and no word why; nothing of the Hessian).  The summary now lists each missing series with its reason."""
    s = _settings(hessian_every=0)
    traj = {"step": np.arange(4), "loss": np.r_[0.5, 0.4, 3e9, np.inf],
            "grad_norm": np.ones(4), "charges/rescale/layers.0": np.ones((4, 3)),
            "charge_drift/rescale/layers.0": np.full((4, 3), np.nan)}
    text = _report.write_summary(str(tmp_path), s, traj, [{"step": 0, "loss": 0.5}], [],
                                 diverged={"step": 3, "reason": "non-finite loss (inf)"}, wall_s=None,
                                 resumed_from=None, detect_error=None)
    section = text.split("## Not recorded\n\n")[1].split("\n\n")[0].splitlines()
    assert section[0].startswith("- evaluation (train / test loss, accuracy): the run diverged at step 3, before its "
                                 "first evaluation"), section
    assert "checkpoint.every = 10" in section[0]
    assert "- Hessian extremes (plots/hessian.png): observables.hessian_every = 0" in section
    assert "- charge drift (plots/charges.png): no finite value in 4 recorded steps" in section
    assert not any(ln.startswith("- Noether charges") or ln.startswith("- gradient norms") for ln in section)


def test_summary_of_a_run_that_recorded_every_series_has_no_missing_section(tmp_path):
    """The list is of what is missing only: a run holding a finite value of every plotted series, its Hessian
    measured once (``hessian_every`` above the run's steps: step 0 only) and an evaluation, lists nothing."""
    s = _settings(hessian_every=50)
    n = 4
    traj = {"step": np.arange(n), "loss": np.ones(n), "grad_norm": np.ones(n), "grad_norm_canonical": np.ones(n),
            "update_horizontal_norm": np.ones(n), "update_vertical_norm": np.ones(n),
            "effective_lr/global": np.ones(n), "charges/a": np.ones(n), "charge_drift/a": np.ones(n),
            "shock_number": np.ones(n), "sharpness_raw": np.r_[2.0, np.nan, np.nan, np.nan],
            "hessian_step": np.r_[0, 0, 0, 0]}
    text = _report.write_summary(str(tmp_path), s, traj, [{"step": 3, "train_loss": 1.0, "test_loss": 1.0}], [],
                                 diverged=None, wall_s=None, resumed_from=None, detect_error=None)
    assert "## Not recorded" not in text, text


def _tiny(**keys):
    from quotient_sgd.config import load_config, validate

    c = load_config(os.path.join(ROOT, "configs", "tiny.py"))
    c.steps, c.checkpoint.every, c.logging.plots = 2, 2, False
    c.observables.names = ("loss",)
    for k, v in keys.items():
        node = c
        for part in k.split(".")[:-1]:
            node = node[part]
        node[k.split(".")[-1]] = v
    return validate(c)


def test_an_init_gauge_that_does_not_keep_the_function_is_refused_before_anything_is_written(tmp_path):
    """``init_gauge`` promises the same function in another parameterisation, but the random element multiplies
    parameters by factors ``exp(u)``, ``|u|`` up to ``2 init_gauge``: at ``init_gauge = 60`` the tiny MLP's outputs
    are NaN (the run "diverged at step 0"), and at 10 the digits CNN's outputs changed by 40 times their size while the
    run trained on without a word.  ``run`` and ``sweep`` now refuse a scale whose re-gauged outputs move by more
    than ``GAUGE_TOLERANCE``, naming the key, before anything is written; a scale that keeps it runs."""
    from quotient_sgd.config import ConfigError
    from quotient_sgd.runner import build, run, sweep
    from quotient_sgd.runner._build import check_init_gauge

    with pytest.raises(ConfigError, match=r"^config\.init_gauge = 60\.0: re-gauging .* does not keep the function"):
        run(_tiny(init_gauge=60.0), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
    s = _tiny(**{"sweep.init_gauge": (1.0, 60.0), "sweep.lr": (0.05,), "sweep.seed": (0,)})
    with pytest.raises(ConfigError, match=r"^config\.sweep\.init_gauge = 60\.0: re-gauging"):
        sweep(s, str(tmp_path / "sweep"))
    assert not os.path.exists(tmp_path / "sweep")
    check_init_gauge(build(s), [("init_gauge", 1.0, [0, 1, 2]), ("init_gauge", 0.0, [0])])  # (kept: no error)
