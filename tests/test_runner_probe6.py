"""Interruptions of the command and a config detail: repeated observable names are refused."""

import pytest

def test_repeated_observable_names_are_refused():
    """``observables.names`` listing a name twice is refused, naming the key, the repeated name and what is
    allowed (as repeated sweep values are); each name once passes."""
    from helpers import tiny_settings

    from quotient_sgd.config import ConfigError

    with pytest.raises(ConfigError) as e:
        tiny_settings(**{"observables.names": ("loss", "grad_norm", "loss")})
    msg = str(e.value)
    assert "observables.names" in msg and "repeats ['loss']" in msg and "'charges'" in msg, msg
    with pytest.raises(ConfigError, match=r"repeats \['charges', 'grad_norm'\]"):
        tiny_settings(**{"observables.names": ("grad_norm", "charges", "grad_norm", "charges")})
    assert tiny_settings(**{"observables.names": ("loss", "grad_norm")}).observables.names == ("loss", "grad_norm")
