"""Configs, runner and CLI: a plain ``ml_collections.ConfigDict`` config, interrupts while plotting, the run
directory lock of a multi-host sweep, and what the run directory records."""

from __future__ import annotations

import os

import ml_collections
import numpy as np
import pytest

from quotient_sgd.cli import main
from quotient_sgd.config import ConfigError, default_config, load_config, validate

_PLAIN = ("import ml_collections\n"
          "import numpy as np\n"
          "from quotient_sgd.config import default_config\n\n\n"
          "def get_config():\n"
          "    config = ml_collections.ConfigDict(default_config().to_dict(){kw})\n"
          "    {line}\n"
          "    return config\n")


@pytest.mark.parametrize("line,key,kind", [
    ("config.optim.lr = True", "lr", "a float"),
    ("config.optim.weight_decay = np.bool_(False)", "weight_decay", "a float"),
    ("config.steps = True", "steps", "an int"),
])
@pytest.mark.parametrize("kw", ["", ", type_safe=False"])
def test_plain_configdict_bool_for_a_number_is_refused(tmp_path, line, key, kind, kw):
    """A config file building its config from ``ml_collections.ConfigDict`` (not ``default_config()``): writing
    ``config.optim.lr = True`` stored ``1.0`` (ml_collections casts an int to a float key, and a bool is an int),
    and the run trained at lr 1.0; now the assignment is refused, naming the key and the value."""
    path = tmp_path / "plain.py"
    path.write_text(_PLAIN.format(kw=kw, line=line))
    with pytest.raises(TypeError, match=rf"'{key}'.*is a bool, and the key holds {kind}"):
        load_config(path)
    # outside the config file's load, ml_collections is left as it was
    c = ml_collections.ConfigDict({"lr": 0.1})
    c.lr = True
    assert c.lr == 1.0 and isinstance(c.lr, float)


def test_plain_configdict_from_scratch_keeps_bool_for_validation(tmp_path):
    """A plain ``ConfigDict`` built from a dict holding ``lr: True`` keeps the bool, and validation refuses it;
    a number assigned to a numeric key still loads (an int to a float key as the float)."""
    path = tmp_path / "scratch.py"
    path.write_text(_PLAIN.format(kw="", line="config.optim.lr = 1"))
    cfg = load_config(path)
    assert validate(cfg).optim.lr == 1.0
    d = default_config().to_dict()
    d["optim"]["lr"] = True
    with pytest.raises(ConfigError, match=r"config\.optim\.lr = True: expected a float, got bool"):
        validate(ml_collections.ConfigDict(d))


def test_cli_plain_configdict_bool_lr_is_refused(tmp_path, monkeypatch, capsys):
    path = tmp_path / "cfg" / "plain.py"
    path.parent.mkdir()
    path.write_text(_PLAIN.format(kw="", line="config.optim.lr = True"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code = main(["quotient-sgd", "run", f"--config={path}", f"--workdir={work / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"config.optim.lr = True (in {path}, line 8): expected a float, got bool" in err, err
    assert "Traceback" not in err and os.listdir(work) == []
