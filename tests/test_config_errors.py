"""Every class of bad config fails on load with a message naming the key, the value and what is allowed --
before any compute, and without writing anything."""

import os

import pytest

from quotient_sgd.cli import main
from quotient_sgd.config import ConfigError, default_config, load_config, quickstart_path, validate


def _cfg(**over):
    c = load_config(quickstart_path())
    for k, v in over.items():
        node = c
        parts = k.split(".")
        for p in parts[:-1]:
            node = node[p]
        with node.unlocked() if hasattr(node, "unlocked") else _null():
            node[parts[-1]] = v
    return c


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("over,needles", [
    ({"optim.lr": -0.1}, ["config.optim.lr", "-0.1", "> 0"]),
    ({"optim.lr": 0.0}, ["config.optim.lr", "0.0", "> 0"]),
    ({"data.batch_size": 5000}, ["config.data.batch_size", "5000", "larger than the training set", "1348"]),
    ({"steps": 0}, ["config.steps", "0", ">= 1"]),
    ({"symmetry.components": ("qk",)}, ["config.symmetry.components", "'qk'", "not a symmetry", "rescale"]),
    ({"observables.noise_every": 5}, ["config.observables.noise_every", "5", "per-example gradients",
                                      "per_example_grads=True"]),
    ({"optim.momentum": 1.5}, ["config.optim.momentum", "1.5", "[0, 1)"]),
    ({"model.name": "resnet"}, ["config.model.name", "'resnet'", "mlp"]),
    ({"sweep.lr": (0.1, -1.0)}, ["config.sweep.lr", "every value must be"]),
    ({"sweep.mode": "zip", "sweep.seed": (0, 1, 2)}, ["config.sweep.mode", "zip needs equally long lists"]),
])
def test_out_of_range_values(over, needles):
    with pytest.raises(ConfigError) as e:
        validate(_cfg(**over))
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_wrong_types():
    c = default_config()
    c.optim.lr = 0.1
    d = c.to_dict()
    d["optim"]["lr"] = "0.1"
    with pytest.raises(ConfigError, match=r"config\.optim\.lr = '0\.1': expected a float, got str"):
        validate(d)
    d = c.to_dict()
    d["steps"] = 10.5
    with pytest.raises(ConfigError, match=r"config\.steps = 10\.5: expected an int"):
        validate(d)
    d = c.to_dict()
    d["model"]["hidden"] = (32, "a")
    with pytest.raises(ConfigError, match=r"config\.model\.hidden\[1\] = 'a': expected an int"):
        validate(d)


def test_unknown_keys():
    d = default_config().to_dict()
    d["optim"]["lrr"] = 0.1
    with pytest.raises(ConfigError, match=r"config\.optim\.lrr: unknown key \(did you mean 'lr'\?\)"):
        validate(d)
    d = default_config().to_dict()
    d["stepz"] = 3
    with pytest.raises(ConfigError, match=r"config\.stepz: unknown key \(did you mean 'steps'\?\)"):
        validate(d)


@pytest.mark.parametrize("args,needle", [
    (["--config.optim.lr=-1"], "config.optim.lr = -1.0: must be a finite number > 0"),
    (["--config.optim.lrr=1"], "'lrr'"),
    (["--config.optim.lr=abc"], "could not convert string to float"),
    (["--config.data.batch_size=100000"], "config.data.batch_size = 100000"),
    (["--config.steps=0"], "config.steps = 0: must be >= 1"),
    (["--config.symmetry.components=('gl',)"], "'gl' is not a symmetry"),
    (["--config.observables.noise_every=3"], "per-example gradients"),
    (["--config=does_not_exist.py"], "does_not_exist.py"),
])
def test_cli_bad_config_writes_nothing(tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(tmp_path)
    wd = tmp_path / "runs" / "x"
    code = main(["quotient-sgd", "run", *args, f"--workdir={wd}"])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err, err
    assert "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_loaded_settings_are_frozen_and_typed():
    s = validate(load_config(quickstart_path()))
    assert isinstance(s.optim.lr, float) and isinstance(s.model.hidden, tuple)
    with pytest.raises(Exception):
        s.optim.lr = 1.0  # frozen
    assert validate(s.to_dict()) == s  # config.json round-trips
