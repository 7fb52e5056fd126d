"""A bool is never a number and a number never a bool, for every typed key of the schema: in a dict, in a config
built in code from ``ml_collections.ConfigDict``, and in a ``--config.<key>=1`` override of a bool key (absl read it
as ``True``).  Each is refused by validation with the message it gives for other wrong types, before anything runs
or is written.  (Not caught: ``ml_collections``' type-safe cast itself stores a bool assigned to a float key of its
own ``ConfigDict`` as ``1.0``, or set through a ``FieldReference``; ``default_config()`` and config files refuse the
assignment instead.)"""

import dataclasses
import os

import ml_collections
import numpy as np
import pytest

from quotient_sgd.cli import main
from quotient_sgd.config import ConfigError, Settings, default_config, validate
from quotient_sgd.config._settings import SECTIONS


def _keys_of(kind):
    """The dotted keys of the schema whose default is exactly of type ``kind``."""
    out = [f.name for f in dataclasses.fields(Settings) if f.name not in SECTIONS and type(f.default) is kind]
    for sect, cls in SECTIONS.items():
        out += [f"{sect}.{f.name}" for f in dataclasses.fields(cls) if type(f.default) is kind]
    return out


FLOAT_KEYS, INT_KEYS, BOOL_KEYS = _keys_of(float), _keys_of(int), _keys_of(bool)


def _node(c, key):
    sect, _, leaf = key.rpartition(".")
    return (c[sect] if sect else c), leaf


def _plain(type_safe=True):
    """A config built in code from ml_collections' own ConfigDict (not default_config()'s)."""
    return ml_collections.ConfigDict(default_config().to_dict(), type_safe=type_safe)


def test_the_schema_has_keys_of_every_kind():
    assert "optim.lr" in FLOAT_KEYS and "init_gauge" in FLOAT_KEYS and len(FLOAT_KEYS) >= 10
    assert "steps" in INT_KEYS and "data.batch_size" in INT_KEYS
    assert "symmetry.enabled" in BOOL_KEYS and "logging.plots" in BOOL_KEYS


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("key", FLOAT_KEYS + INT_KEYS)
def test_bool_assigned_in_code_to_a_number_key_is_refused(key, value):
    """default_config()'s ConfigDict refuses the assignment itself, naming the key; in ml_collections' own, an int
    key keeps the bool, which validation refuses naming the key, the bool and the type it needs (a float key
    casts it to 1.0 / 0.0 on assignment: the limitation in the module docstring)."""
    node, leaf = _node(default_config(), key)
    with pytest.raises(TypeError, match=rf"'{leaf}'.*is a bool"):
        setattr(node, leaf, value)
    if key in INT_KEYS:
        for type_safe in (True, False):
            c = _plain(type_safe)
            node, leaf = _node(c, key)
            setattr(node, leaf, value)
            with pytest.raises(ConfigError, match=rf"^config\.{key} = {value}: expected an int, got bool$"):
                validate(c)


@pytest.mark.parametrize("value", [1, 0, 1.0, np.int64(1), np.float32(0.0)])
@pytest.mark.parametrize("key", BOOL_KEYS)
def test_number_for_a_bool_key_is_refused(key, value):
    """In a dict, a ConfigDict without type safety, or one with it (ml_collections refuses the assignment)."""
    d = default_config().to_dict()
    sect, _, leaf = key.rpartition(".")
    d[sect][leaf] = value
    with pytest.raises(ConfigError, match=rf"^config\.{key} = .*expected a bool \(True/False\), got "):
        validate(d)
    c = _plain(type_safe=False)
    setattr(c[sect], leaf, value)
    with pytest.raises(ConfigError, match=rf"^config\.{key} = .*expected a bool \(True/False\), got "):
        validate(c)
    with pytest.raises(TypeError, match=rf"'{leaf}'.*cannot be casted to type <class 'bool'>"):
        setattr(_plain()[sect], leaf, value)


def _reached(monkeypatch):
    """The runner replaced by one that records the settings it would run."""
    import quotient_sgd.runner as runner_pkg

    seen = []

    class Reached(Exception):
        pass

    def run(settings, workdir, **kw):
        seen.append(settings)
        raise Reached

    monkeypatch.setattr(runner_pkg, "run", run)
    return seen, Reached


@pytest.mark.parametrize("args,key", [
    (["--config.symmetry.enabled=1"], "symmetry.enabled"),
    (["--config.logging.plots=0"], "logging.plots"),
    (["-config.optim.nesterov=0"], "optim.nesterov"),
    (["--config.checkpoint.enabled=1.0"], "checkpoint.enabled"),
])
def test_cli_number_for_a_bool_key_writes_nothing(tmp_path, monkeypatch, capsys, args, key):
    """absl read ``--config.logging.plots=0`` as ``False``: the run started."""
    seen, _ = _reached(monkeypatch)
    monkeypatch.chdir(tmp_path)
    code = main(["quotient-sgd", "run", *args, f"--workdir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"config.{key} = " in err and "expected a bool (True/False), got a number" in err, err
    assert f"--config.{key}=True" in err and "Traceback" not in err, err
    assert seen == [] and os.listdir(tmp_path) == []


@pytest.mark.parametrize("args,expect", [
    (["--config.optim.nesterov=True"], {"nesterov": True}),
    (["--config.optim.nesterov"], {"nesterov": True}),
    (["--noconfig.logging.plots"], {"plots": False}),
    (["--config.logging.plots=false"], {"plots": False}),
    (["--config.optim.lr=1"], {"lr": 1.0}),
])
def test_cli_bools_and_numbers_written_as_such_still_run(tmp_path, monkeypatch, args, expect):
    seen, reached = _reached(monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(reached):
        main(["quotient-sgd", "run", *args, f"--workdir={tmp_path / 'r'}"])
    s = seen[0]
    got = {"nesterov": s.optim.nesterov, "plots": s.logging.plots, "lr": s.optim.lr}
    assert {k: got[k] for k in expect} == expect
    assert type(s.optim.lr) is float
