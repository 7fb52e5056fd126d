"""``quotient_sgd.config.load_config`` on config files the command line refuses: each refused naming the file."""

import pytest

from quotient_sgd.config import ConfigError, load_config, validate


@pytest.mark.parametrize("body,overrides,needle", [
    (None, None, "config file {path!r} is a directory"),
    ("def get_config(scale):\n    return None\n", None,
     "cannot load the config file {path!r}: get_config(scale) cannot be called without arguments"),
    ("get_config = 3\n", None, "cannot load the config file {path!r}: its get_config is int, not a function"),
    ("def get_config():\n    return None\n", {"steps": 3},
     "cannot load the config file {path!r}: get_config() returned None (NoneType), not a ConfigDict"),
    ("def get_config():\n    return [1, 2]\n", {"optim.lr": 0.1},
     "cannot load the config file {path!r}: get_config() returned [1, 2] (list), not a ConfigDict"),
])
def test_load_config_names_the_file_it_cannot_load(tmp_path, body, overrides, needle):
    """A directory was said "not to exist"; a get_config that needs arguments (or is no function) failed in a bare
    ``TypeError`` naming no file; overrides of a get_config() returning ``None`` were refused as "config.steps = 3:
    config. is a value, not a section; set it as config."  Each is a ConfigError naming the file (the messages the
    command gives for these files)."""
    path = tmp_path / "c.py"
    if body is None:
        path.mkdir()
    else:
        path.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert needle.format(path=str(path)) in str(err.value), str(err.value)
    assert "config. " not in str(err.value)


def test_load_config_still_calls_a_get_config_whose_parameters_have_defaults(tmp_path):
    """What the checks above leave alone: a get_config whose arguments all have defaults is called with none (the
    grokking config's get_config(scale=None)); a config without overrides is returned as get_config() gives it,
    for validate to refuse."""
    path = tmp_path / "c.py"
    path.write_text("from quotient_sgd.config import default_config\n\n"
                    "def get_config(scale=None, *args, **kwargs):\n"
                    "    c = default_config()\n"
                    "    c.steps = 7 if scale is None else 8\n"
                    "    return c\n")
    assert validate(load_config(path, {"data.batch_size": 32})).steps == 7
    (tmp_path / "n.py").write_text("def get_config():\n    return None\n")
    assert load_config(tmp_path / "n.py") is None
    with pytest.raises(ConfigError, match="expected a ConfigDict"):
        validate(load_config(tmp_path / "n.py"))
