"""Probe 15: configs, experiments and resume: model constructor errors that escaped validation, integer keys
given floats in tuples, experiment results that did not record their config and were overwritten, experiment
values that were not range-checked, and metric rows lost before the newest checkpoint."""

import os
import re

import numpy as np
import pytest

from quotient_sgd.config import ConfigError, default_config, load_config, validate

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = os.path.join(ROOT, "configs", "tiny.py")


# ---- defect 1: a model constructor's ValueError escaped validate ----------------------------------------------
@pytest.mark.parametrize("changes, key, value", [
    ({"model.name": "transformer", "data.name": "modular_arithmetic", "model.d_model": 1, "model.num_heads": 1},
     "model.d_model", "1"),
    ({"model.name": "cnn", "data.name": "digits", "model.norm": "layer", "model.channels": (4, 1)},
     "model.channels", "(4, 1)"),
])
def test_settings_a_model_refuses_are_config_errors(changes, key, value):
    """A Transformer with ``model.d_model = 1`` and a CNN with ``model.norm = 'layer'`` over a one-channel layer
    were refused during ``validate`` by the model's constructor, in a ``ValueError`` ("Transformer: d_model must
    be >= 2") that named no config key; they are ConfigErrors naming the key, the value and what is allowed."""
    cfg = default_config()
    for k, v in changes.items():
        sect, name = k.split(".")
        cfg[sect][name] = v
    with pytest.raises(ConfigError, match=rf"config\.{re.escape(key)} = {re.escape(value)}(?s:.*)(>= 2|at least 2)"):
        validate(cfg)


def test_a_model_constructor_error_validation_did_not_foresee_is_a_config_error(monkeypatch):
    """Any other ``ValueError`` of a model constructor met while validation builds the model abstractly is a
    ConfigError naming ``model.name`` and the model's own reason."""
    from quotient_sgd.runner import _build

    def refuse(s, rngs):
        raise ValueError("MLP: something about the widths")

    monkeypatch.setattr(_build, "make_model", refuse)
    cfg = default_config()
    cfg.model.hidden = (13, 7)  # (settings no earlier test built: the abstract model is cached per settings)
    with pytest.raises(ConfigError, match=r"config\.model\.name = 'mlp'.*MLP: something about the widths"):
        validate(cfg)


# ---- defect 5: an integer sweep axis given floats ---------------------------------------------------------------
@pytest.mark.parametrize("key, value", [("sweep.seed", (1.0,)), ("sweep.batch_size", (8, 16.0)), ("steps", 10.0),
                                        ("model.hidden", (np.float64(8.0),))])
def test_a_float_for_an_integer_key_is_refused_in_tuples_as_in_scalars(key, value):
    """``--config.seed=1.0`` is refused ("expected an int") while ``--config.sweep.seed="(1.0,)"`` was read as
    ``(1,)``: a float for an integer key (or an element of an integer tuple) is refused, whole or not, naming the
    key and the element; integers (NumPy's too) are still read."""
    cfg = load_config(TINY)
    d = cfg.to_dict()
    sect, _, name = key.rpartition(".")
    (d[sect] if sect else d)[name] = value
    with pytest.raises(ConfigError, match=r"expected an int, got float"):
        validate(d)
    (d[sect] if sect else d)[name] = (tuple(int(v) for v in value) if isinstance(value, tuple) else int(value))
    validate(d)


def test_a_float_sweep_seed_on_the_command_line_is_refused(tmp_path, capsys):
    from quotient_sgd.cli import main

    wd = tmp_path / "sw"
    assert main(["quotient-sgd", "sweep", f"--config={TINY}", "--config.sweep.seed=(1.0,)", f"--workdir={wd}"]) == 2
    assert "config.sweep.seed[0] = 1.0: expected an int" in capsys.readouterr().err
    assert not wd.exists()
