"""validate: a plain dict whose sections are ConfigDicts (``dict(config, steps=5)``) is a config."""

import os

import ml_collections
import pytest

from quotient_sgd.config import ConfigError, load_config, validate

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")


def test_dict_with_configdict_sections_validates_as_the_config():
    """``validate(dict(config, steps=5))`` (the sections stay ConfigDicts) was refused with the self-contradicting
    "config.checkpoint = ...: expected a section (ConfigDict)", as was ``{"optim": ConfigDict(...)}``.  Such a
    section now reads as the dict it holds: the same Settings as the ConfigDict itself with the key replaced; an
    unknown key inside it is still named, and a section given as a number still refused."""
    c = load_config(TINY)
    assert validate(dict(c, steps=5)) == validate(c).replace(steps=5)
    for section in (ml_collections.ConfigDict({"lr": 0.2}), ml_collections.FrozenConfigDict({"lr": 0.2})):
        assert validate({"optim": section}).optim.lr == 0.2
    with pytest.raises(ConfigError, match=r"config\.optim\.lrr: unknown key \(did you mean 'lr'\?\)"):
        validate({"optim": ml_collections.ConfigDict({"lrr": 0.2})})
    with pytest.raises(ConfigError, match=r"config\.optim = 3: expected a section"):
        validate({"optim": 3})
