"""Bad config values beyond those of test_config_errors.py: each is refused on load with a message naming the key,
the value and what is allowed, and nothing is written."""

import os

import pytest

from quotient_sgd.cli import main
from quotient_sgd.config import ConfigError, load_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(**over):
    c = load_config(os.path.join(ROOT, "configs", "tiny.py"))
    for k, v in over.items():
        c.update_from_flattened_dict({k: v})
    return c


@pytest.mark.parametrize("over,needle", [
    ({"sweep.lr": (0.1, 0.2, -0.5)}, "config.sweep.lr = (0.1, 0.2, -0.5): every value must be a finite number > 0; "
                                     "sweep.lr[2] = -0.5 is not"),
    ({"sweep.lr": (0.0, 0.2)}, "sweep.lr[0] = 0.0 is not"),
    ({"sweep.lr": (0.1, float("nan"))}, "sweep.lr[1] = nan is not"),
    ({"sweep.batch_size": (4, 0, 8)}, "config.sweep.batch_size = (4, 0, 8): every value must be in [1, 128] (the "
                                      "training set of 'teacher_student'); sweep.batch_size[1] = 0 is not"),
    ({"sweep.seed": (0, -(2**31) - 1)}, "sweep.seed[1] = -2147483649 is not"),
    ({"sweep.weight_decay": (0.0, -1e-4)}, "config.sweep.weight_decay = (0.0, -0.0001): every value must be a finite "
                                           "number >= 0; sweep.weight_decay[1] = -0.0001 is not"),
    ({"sweep.momentum": (0.5, 0.9, 1.0)}, "config.sweep.momentum = (0.5, 0.9, 1.0): every value must be in [0, 1); "
                                          "sweep.momentum[2] = 1.0 is not"),
    ({"sweep.init_gauge": (0.0, float("inf"))}, "sweep.init_gauge[1] = inf is not"),
])
def test_invalid_sweep_member_is_named(over, needle):
    """An invalid value in a sweep list is named with its position, not only the whole list."""
    with pytest.raises(ConfigError) as e:
        validate(_tiny(**over))
    assert needle in str(e.value), str(e.value)


def test_cli_invalid_sweep_member_is_named_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["quotient-sgd", "sweep", f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}",
                 "--config.sweep.lr=(0.05,0.1,0)", f"--workdir={tmp_path / 'sw'}"])
    err = capsys.readouterr().err
    assert code == 2 and "config.sweep.lr = (0.05, 0.1, 0.0)" in err and "sweep.lr[2] = 0.0 is not" in err, err
    assert "Traceback" not in err and os.listdir(tmp_path) == []


def test_run_name_with_a_nul_character_is_refused(tmp_path, monkeypatch, capsys):
    """A config.name holding a NUL character passed validation; the default run directory runs/<name> then failed
    with a ValueError traceback from os.makedirs after runs/ had been created."""
    with pytest.raises(ConfigError) as e:
        validate(_tiny(name="a\0b"))
    assert "config.name = 'a\\x00b'" in str(e.value) and "without '/' or NUL characters" in str(e.value), str(e.value)
    validate(_tiny(name="a b-c.d"))  # its neighbour still validates
    path = tmp_path / "c.py"
    path.write_text("from quotient_sgd.config import default_config\n\n\ndef get_config():\n"
                    "    config = default_config()\n    config.name = 'a\\0b'\n    return config\n")
    monkeypatch.chdir(tmp_path)
    code = main(["quotient-sgd", "run", f"--config={path}"])
    err = capsys.readouterr().err
    assert code == 2 and "config.name = 'a\\x00b'" in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == ["c.py"]
