"""Run directories' outputs on cases the other runner tests do not cover: the summary of a run whose plots have
panels without data."""

import numpy as np

from quotient_sgd.config import default_config, from_dict
from quotient_sgd.runner import _report


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
