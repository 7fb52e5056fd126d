"""Logging: metrics.jsonl always (one row per logged step, evaluation at chunk ends); TensorBoard when asked."""

import json
import os
import shutil

import jax
import numpy as np

from helpers import checkpoint_steps, load_metric_rows, read_tensorboard, tiny_settings
from quotient_sgd.config import load_config, validate
from quotient_sgd.runner import run, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_jsonl_and_tensorboard(tmp_path):
    c = load_config(os.path.join(ROOT, "configs", "tiny.py"))
    c.steps = 20
    c.logging.plots = False
    c.logging.tensorboard = True
    run(validate(c), str(tmp_path / "r"))
    rows = [json.loads(line) for line in open(tmp_path / "r" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 5, 9, 10, 15, 19]  # every 5 steps and each chunk's last step
    assert all("loss" in r and "grad_norm" in r for r in rows)
    assert "test_loss" in rows[2] and "test_loss" in rows[-1] and "test_loss" not in rows[0]
    tb = os.listdir(tmp_path / "r" / "tensorboard")
    assert any(f.startswith("events.out.tfevents") for f in tb)


def _tensorboard_matches_metrics(run_dir):
    """Every scalar of metrics.jsonl is a TensorBoard tag with the same steps (each once) and values."""
    rows = load_metric_rows(run_dir)
    tb = read_tensorboard(run_dir)
    want: dict[str, list] = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and np.isfinite(float(v)):  # NaN (not defined for the run) is left out
                want.setdefault(k, []).append((r["step"], float(v)))
    assert sorted(tb) == sorted(want)
    for k in want:
        assert [s for s, _ in tb[k]] == [s for s, _ in want[k]], k
        np.testing.assert_allclose([v for _, v in tb[k]], [v for _, v in want[k]], rtol=1e-6, err_msg=k)


def _tiny(steps=30, **over):
    return tiny_settings(steps, **{"logging.tensorboard": True, **over})


def test_tensorboard_of_a_resumed_run_has_every_row_once(tmp_path):
    wd = str(tmp_path / "r")
    s = _tiny()
    run(s, wd, max_chunks=2)
    assert checkpoint_steps(wd) == [10, 20]
    # as if killed after the rows of [10, 20) were written but before checkpoint 20 was finalised
    shutil.rmtree(os.path.join(wd, "checkpoints", "20"))
    assert run(s, wd).resumed_from == 10
    _tensorboard_matches_metrics(wd)


def test_tensorboard_leaves_out_values_not_defined_for_the_run():
    """A NaN in a metric row (an observable not defined for the run: ``charge_drift_predicted`` under Adam is NaN
    at every step; metrics.jsonl keeps it as "nan") gets no TensorBoard scalar: tensorboardX warned on each."""
    from quotient_sgd.runner._run import write_tensorboard

    class Writer:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

        def flush(self):
            pass

    tb = Writer()
    write_tensorboard(tb, [{"step": 0, "loss": 1.5, "charge_drift_predicted/t": "nan", "grad_norm": np.float32(2)},
                           {"step": 5, "loss": np.inf, "charge_drift_predicted/t": float("nan")}])
    assert tb.scalars == [("loss", 1.5, 0), ("grad_norm", 2.0, 0)]


def test_sweep_writes_tensorboard_per_member(tmp_path):
    s = _tiny(20, **{"sweep.seed": (), "sweep.lr": (0.02, 0.05)})
    res = sweep(s, str(tmp_path / "sw"), devices=jax.devices()[:1])
    for d in res.member_dirs:
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(d, "tensorboard")))
        _tensorboard_matches_metrics(d)
