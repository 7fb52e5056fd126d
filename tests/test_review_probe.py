"""Review probes of the config, cli, hj, diagnostics, observables and optim changes: each test pins a defect that
was found and fixed."""

from __future__ import annotations

import signal
import sys
import time

import pytest


class _RaisesInDel:
    """An object whose finaliser raises ``exc``: Python drops it to ``sys.unraisablehook`` (as it drops a Ctrl-C
    landing in a gc or weakref callback)."""

    def __init__(self, exc):
        self.exc = exc

    def __del__(self):
        raise self.exc


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_dropped_interrupt_still_due_when_the_block_ends_is_raised_in_the_block(sig):
    """A dropped interrupt is delivered again 10 ms later; when the block ended within those 10 ms, the signal
    reached the code after the block (under its restored handlers: a stray KeyboardInterrupt in the caller, or a
    SIGTERM that ends the process). It is now raised as the block ends, and nothing reaches the code after it."""
    from quotient_sgd.cli import _sigterm_raises, _Terminated

    after = []

    def record(signum, frame):
        after.append(signum)

    previous = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (the block takes over SIGINT only from Python's own)
    hook = sys.unraisablehook
    try:
        exc = _Terminated() if sig == "SIGTERM" else KeyboardInterrupt()
        with pytest.raises(KeyboardInterrupt) as info:
            with _sigterm_raises():
                obj = _RaisesInDel(exc)
                del obj  # dropped: the hook schedules the delivery
        assert (type(info.value) is _Terminated) == (sig == "SIGTERM")
        assert sys.unraisablehook is hook
        signal.signal(signal.SIGINT, record)
        after += _interrupts_within(0.1)
        assert after == []
    finally:
        sys.unraisablehook = hook
        for s, h in previous.items():
            signal.signal(s, h)


def _interrupts_within(seconds):
    """``["KeyboardInterrupt"]`` if one arrives while waiting ``seconds``, else ``[]``."""
    try:
        deadline = time.time() + seconds
        while time.time() < deadline:
            time.sleep(0.002)
    except KeyboardInterrupt:
        return ["KeyboardInterrupt"]
    return []


def test_a_dropped_interrupt_is_delivered_once_and_the_hook_is_restored_when_the_block_raises():
    """While the block runs, a dropped Ctrl-C is delivered once (the handler raises in the block); the previous
    ``sys.unraisablehook`` is back after the block, also when the block raised."""
    from quotient_sgd.cli import _sigterm_raises

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    hook = sys.unraisablehook
    caught = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with _sigterm_raises():
                obj = _RaisesInDel(KeyboardInterrupt())
                del obj
                deadline = time.time() + 1.0
                while time.time() < deadline:
                    time.sleep(0.002)
        assert sys.unraisablehook is hook and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        caught += _interrupts_within(0.1)
        assert caught == []
    finally:
        sys.unraisablehook = hook
        signal.signal(signal.SIGINT, previous)


def test_an_hj_field_relaxing_to_a_constant_is_not_reported_under_resolved():
    """A viscous HJ field relaxing to a constant (smooth, resolved on any grid) was reported under-resolved once
    its gradient fell below the rounding of its mean: the top-band amplitudes were that rounding (tail up to 1,
    "use about n=128"). Amplitudes at the rounding level count as 0; a shock thinner than the grid still warns."""
    import warnings

    import jax.numpy as jnp
    import numpy as np

    from quotient_sgd.hj import SPECTRAL_TAIL_WARN, Grid, solve_hj

    g = Grid(32, 0.0, 2 * np.pi)
    x = g.x
    t1 = float(np.log(1.0 / np.finfo(x.dtype).eps)) + 4.0  # the sin mode decays as exp(-t): below rounding at t1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no under-resolution warning
        sol = solve_hj(1.0 + 0.5 * jnp.sin(x), g, nu=1.0, t1=t1, ts=np.linspace(t1 - 8.0, t1, 5))
    assert np.all(np.asarray(sol.spectral_tail) < SPECTRAL_TAIL_WARN), sol.spectral_tail
    # a top band above the rounding still counts: a field with a 1e-2 mode near the cut
    from quotient_sgd.hj import Spectral

    rough = jnp.stack([1.0 + jnp.sin(x) + 1e-2 * jnp.sin(10 * x)])
    tail = np.asarray(Spectral().spectral_tail(g, "hj", rough))
    assert tail[0] > SPECTRAL_TAIL_WARN, tail


def test_hyperparameters_of_an_inject_hyperparams_nested_in_another_are_found_and_set():
    """An ``inject_hyperparams`` nested in another's inner state (an injected clip around an injected SGD) was
    invisible: ``quotient_trajectory``'s init refused ``SGDSpec("learning_rate", momentum="momentum")`` although
    both are injected, and ``set_hyperparams`` could not set them."""
    import jax.numpy as jnp
    import numpy as np
    import optax

    from quotient_sgd.optim import SGDSpec, injected_hyperparams, quotient_trajectory, set_hyperparams
    from quotient_sgd.symmetry import Scale

    group = Scale(members=((("w",), None),), name="scale/w")
    params = {"w": jnp.ones((3,))}
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
    tx = optax.inject_hyperparams(lambda clip: optax.chain(optax.clip(clip), sgd))(clip=1.0)
    state = tx.init(params)
    assert sorted(injected_hyperparams(state)) == ["clip", "learning_rate", "momentum"]
    changed = set_hyperparams(state, momentum=0.5, clip=2.0)
    got = injected_hyperparams(changed)
    np.testing.assert_allclose([float(got["momentum"]), float(got["clip"]), float(got["learning_rate"])],
                               [0.5, 2.0, 0.1], rtol=1e-6)
    quotient_trajectory(tx, group, spec=SGDSpec("learning_rate", momentum="momentum"),
                        observables=("loss",)).init(params)
    with pytest.raises(KeyError, match=r"momentum='beta'.*injected: \['clip', 'learning_rate', 'momentum'\]"):
        quotient_trajectory(tx, group, spec=SGDSpec("learning_rate", momentum="beta"),
                            observables=("loss",)).init(params)


def test_kind_of_a_non_string_key_is_a_key_error_naming_it():
    """``kind_of`` split the key on "/" before the look-up: a non-string key raised AttributeError ('int' object
    has no attribute 'split') instead of the KeyError naming the key that an unknown key gets."""
    from quotient_sgd.observables import kind_of

    assert kind_of("charges/rescale/layers.0") == kind_of("charges")
    for key in (3, None):
        with pytest.raises(KeyError, match=f"trajectory key {key!r}"):
            kind_of(key)


def test_a_config_section_replaced_by_an_ml_collections_configdict_is_accepted():
    """``config.optim = ml_collections.ConfigDict({...})`` in a config file worked while ``default_config()``
    returned ml_collections' ConfigDict; with its sections StrictConfigDicts, type safety refused the other class
    ("Could not override field 'optim'"). The section's keys now become a StrictConfigDict section, which still
    refuses a bool for a numeric key."""
    import ml_collections

    from quotient_sgd.config import default_config, validate

    values = dict(default_config().optim.to_dict(), lr=0.3, momentum=0.5)
    for section in (ml_collections.ConfigDict(values), ml_collections.FrozenConfigDict(values)):
        config = default_config()
        config.optim = section
        settings = validate(config)
        assert (settings.optim.lr, settings.optim.momentum) == (0.3, 0.5)
        with pytest.raises(TypeError, match="'lr'.*is a bool"):
            config.optim.lr = True


def test_the_edges_accept_a_momentum_given_as_a_0d_array():
    """``stability_edge`` / ``fold_edge`` / ``fold_levels_for`` converted ``momentum`` with ``float()`` and so took
    a 0-d NumPy or JAX array (the momentum read back from an optimiser state); the check that refuses momentum >= 1
    refused every array. A 0-d real array is accepted with the value of the number; an array >= 1, a bool array
    and a 1-d array are still refused."""
    import jax.numpy as jnp
    import numpy as np

    from quotient_sgd.diagnostics import fold_edge, fold_levels_for, stability_edge

    for beta in (np.asarray(0.5), jnp.asarray(0.5), np.float32(0.5)):
        assert stability_edge(beta) == stability_edge(0.5)
        assert fold_edge(beta, True) == fold_edge(0.5, True)
        assert fold_levels_for((1.0, 2.0), beta) == fold_levels_for((1.0, 2.0), 0.5)
    for bad in (jnp.asarray(1.0), np.asarray(True), np.asarray([0.5]), "0.5"):
        with pytest.raises(ValueError, match=r"stability_edge: momentum=.*need a number in \[0, 1\)"):
            stability_edge(bad)
