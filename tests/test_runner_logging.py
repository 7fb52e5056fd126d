"""Logging: metrics.jsonl always (one row per logged step, evaluation at chunk ends); TensorBoard when asked."""

import json
import os

from quotient_sgd.config import load_config, validate
from quotient_sgd.runner import run

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
