"""Config values beyond what Python can convert or print are refused naming the key."""

import sys

import pytest

from quotient_sgd.config import ConfigError, default_config, load_config, validate

HUGE = 10**5000  # more digits than Python prints (sys.get_int_max_str_digits() is 4300 by default)


@pytest.fixture(autouse=True)
def _default_int_digits_limit():
    """Python's default limit on the digits of an integer it prints (PYTHONINTMAXSTRDIGITS may change it)."""
    before = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(4300)
    yield
    sys.set_int_max_str_digits(before)


@pytest.mark.parametrize("cfg, key", [
    ({"steps": HUGE}, "config.steps"),
    ({"seed": -HUGE}, "config.seed"),
    ({"sweep": {"seed": (0, HUGE)}}, "config.sweep.seed[1]"),
    ({"model": {"hidden": (HUGE,)}}, "config.model.hidden[0]"),
    ({"data": {"name": "sparse_parity", "n_bits": HUGE}}, "config.data.n_bits"),
])
def test_unprintable_integer_is_refused_naming_the_key(cfg, key):
    # (every message naming such a value failed in a bare "ValueError: Exceeds the limit (4300 digits) for
    # integer string conversion")
    with pytest.raises(ConfigError, match=r"int32 range") as e:
        validate(cfg)
    assert str(e.value).startswith(key + " = an integer of about 5001 digits")


@pytest.mark.parametrize("cfg, key", [
    ({"optim": {"lr": 10**400}}, "config.optim.lr"),
    ({"sweep": {"lr": (0.1, 10**400)}}, r"config.sweep.lr\[1\]"),
    ({"data": {"name": "teacher_student", "noise": HUGE}}, "config.data.noise"),
])
def test_integer_beyond_float_range_is_refused_naming_the_key(cfg, key):
    # (a bare "OverflowError: int too large to convert to float")
    with pytest.raises(ConfigError, match=key + r": .*beyond the range of a float"):
        validate(cfg)


def test_config_dict_refuses_integer_beyond_float_range(tmp_path):
    c = default_config()
    with pytest.raises(TypeError, match=r"'lr'.*beyond the range of a float"):
        c.optim.lr = 10**400
    c.optim.lr = 10**30  # (a float key still takes an integer within range, as a float)
    assert c.optim.lr == 1e30 and isinstance(c.optim.lr, float)
    # a config file built on ml_collections' own ConfigDict, loaded by load_config
    path = tmp_path / "big.py"
    path.write_text("import ml_collections\nfrom quotient_sgd.config import default_config\n\n\ndef get_config():\n"
                    "    c = ml_collections.ConfigDict(default_config().to_dict())\n"
                    "    c.optim.lr = 10**400\n    return c\n")
    with pytest.raises(TypeError, match=r"'lr'.*beyond the range of a float"):
        load_config(str(path))


def test_load_config_override_beyond_float_range_is_refused_naming_the_key():
    # (a ConfigError was meant, but its message's repr of 10**5000 failed in a bare ValueError)
    from quotient_sgd.config import quickstart_path

    for value in (10**400, HUGE):
        with pytest.raises(ConfigError, match=r"^config\.optim\.lr: .*beyond the range of a float"):
            load_config(quickstart_path(), {"optim.lr": value})


def test_modular_arithmetic_float32_fraction_checked_as_the_split_is_made():
    # np.float32(0.9999946) at p = 303: the check's product in float32 left a test pair (91808 training pairs), the
    # split's in float64 none (round(0.9999945759773254 * 303**2) = 91809 = p^2): an empty test split, silently
    import jax.numpy as jnp
    import numpy as np

    from quotient_sgd.data import modular_arithmetic

    p, frac = 303, np.float32(0.9999946)
    assert round(float(frac) * p * p) == p * p  # (no pair held out by the split as made)
    for value in (frac, jnp.float32(frac), float(frac)):
        with pytest.raises(ValueError, match=r"train_fraction=.*leaving at least one pair on each side"):
            modular_arithmetic(p=p, train_fraction=value, encoding="tokens")
    d = modular_arithmetic(p=5, train_fraction=np.float32(0.4))  # (a float32 fraction is still taken)
    assert (d.num_train, d.num_test) == (round(0.4 * 25), 25 - round(0.4 * 25))
