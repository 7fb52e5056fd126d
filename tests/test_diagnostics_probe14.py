"""The diagnostics and the experiment scripts on cases beyond their tests: overrides the scripts refused only
after computing, :func:`~quotient_sgd.diagnostics.cusum_threshold` at the boundaries of its arguments."""

import os
import sys

import numpy as np
import pytest

from helpers import EXPERIMENTS, experiment_script, never_run

sys.path.insert(0, EXPERIMENTS)


@pytest.mark.parametrize("value", ["2", "0.0001"])
def test_shock_lr_refuses_an_init_scale_shock_aware_lr_refuses_before_computing(value, tmp_path, monkeypatch):
    """``experiments/shock_lr.py init_scale=2`` passed the config check (any number > 0), trained the constant
    and cosine runs, then stopped in ``shock_aware_lr``'s own ValueError traceback ("cap" never lengthens the
    inner step; below ``min_scale = 0.001`` likewise): the config now refuses it by name before anything runs."""
    E = experiment_script("shock_lr")
    monkeypatch.setenv("QSGD_EXPERIMENT_OUT", str(tmp_path))
    monkeypatch.setattr(E, "run", never_run)
    with pytest.raises(SystemExit) as err:
        E.main(["scale=test", f"init_scale={value}"])
    msg = str(err.value.code)
    assert "init_scale" in msg and "[0.001, 1]" in msg
    # the bounds themselves are what shock_aware_lr takes under both policies
    import optax

    from quotient_sgd.diagnostics import shock_aware_lr

    for s in (1e-3, 1.0):
        shock_aware_lr(optax.sgd(0.1), policy="cap", init_scale=s)
        shock_aware_lr(optax.sgd(0.1), policy="track", max_scale=4.0, init_scale=s)


@pytest.fixture
def small_cusum_budget(monkeypatch):
    """:mod:`._cusum`'s simulation limits made small (the defect does not depend on them), its cache cleared
    before and after."""
    from quotient_sgd.diagnostics import _cusum

    monkeypatch.setattr(_cusum, "_MAX_BLOCKS", 64, raising=False)
    monkeypatch.setattr(_cusum, "_MAX_VALUES", 2**16)
    _cusum._threshold.cache_clear()
    yield _cusum
    _cusum._threshold.cache_clear()


def test_cusum_threshold_of_a_very_long_series_is_not_simulated_in_full(small_cusum_budget):
    """``cusum_threshold(10**12)`` drew 500 series of 10^12 values at once (a bare MemoryError; 10^6 blocks drew
    4 GB and took about ten minutes): above ``_MAX_BLOCKS`` the threshold is that of ``_MAX_BLOCKS`` blocks at
    the level of ``n / _MAX_BLOCKS`` independent stretches.  It grows with the length, and for 1024 blocks it is
    within 0.1 of (and above) the one simulated in full."""
    cut = small_cusum_budget
    h64, h1024, h_huge = (cut.cusum_threshold(n, 0.05, seed=7) for n in (64, 1024, 10**12))
    assert np.isfinite(h_huge) and h64 < h1024 < h_huge
    cut._MAX_BLOCKS = 2048
    cut._threshold.cache_clear()
    full = cut.cusum_threshold(1024, 0.05, seed=7)
    assert full <= h1024 < full + 0.1


def test_cusum_threshold_at_the_smallest_alpha_is_finite(small_cusum_budget):
    """``alpha = 5e-324`` (the smallest float; anything below 1e-307) failed in a bare "cannot convert float
    infinity to integer" (the simulation count 20 / alpha), and below 1e-305 the tail extrapolation's ``log(q /
    alpha)`` overflowed to an infinite threshold; now finite, and no lower than at a larger alpha."""
    cut = small_cusum_budget
    tiny, small = cut.cusum_threshold(50, 5e-324, seed=7), cut.cusum_threshold(50, 1e-12, seed=7)
    assert np.isfinite(tiny) and tiny > small


@pytest.mark.parametrize("name", ["catapult", "edge_of_stability", "grokking", "hj_slices", "normalised_cnn",
                                  "shock_lr"])
def test_experiment_scripts_answer_help_with_their_keys(name, tmp_path, monkeypatch, capsys):
    """``python experiments/<name>.py --help`` stopped with "arguments are key=value overrides ..., got '--help'"
    (exit status 1): it now prints the script's docstring and every config key with its default and what it
    allows, and exits 0 without computing or writing anything."""
    import _common as C

    E = experiment_script(name)
    monkeypatch.setenv("QSGD_EXPERIMENT_OUT", str(tmp_path))
    monkeypatch.setattr(E, "run", never_run)
    with pytest.raises(SystemExit) as err:
        E.main(["scale=test", "--help"])
    assert err.value.code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for key, _ in C._leaves(C.config_module(name).get_config("cpu")):
        if key.endswith("scale"):
            continue
        # (every key with what it allows: experiment 5's ``model`` was shown as ``model=[]`` alone)
        line = next(ln for ln in lines if ln.startswith(f"  {key}="))
        assert "   (" in line, line
    assert "seed" in out and os.listdir(tmp_path) == []


@pytest.mark.parametrize("seed", [-1, 1.5, "a", True, None])
def test_cusum_threshold_refuses_a_seed_that_is_not_a_count_by_name(seed):
    """``cusum_threshold(seed=-1)`` / ``1.5`` / ``"a"`` failed in NumPy's bare "expected non-negative integer" /
    "SeedSequence expects int", ``True`` ran as seed 1 and ``None`` drew a fresh random seed whose threshold the
    cache then kept as if fixed: each is now refused naming ``seed``; NumPy and 0-d JAX integers still count."""
    import jax.numpy as jnp

    from quotient_sgd.diagnostics import cusum_threshold

    with pytest.raises(ValueError, match=r"cusum_threshold: seed=.* is not allowed; need an integer >= 0"):
        cusum_threshold(30, seed=seed)
    h = cusum_threshold(30, seed=3)
    assert cusum_threshold(30, seed=np.int64(3)) == cusum_threshold(30, seed=jnp.int32(3)) == h


@pytest.mark.parametrize("name", ["catapult", "edge_of_stability", "grokking", "hj_slices", "normalised_cnn",
                                  "shock_lr"])
def test_an_output_location_that_cannot_be_written_is_refused_before_computing(name, tmp_path, monkeypatch):
    """``QSGD_EXPERIMENT_OUT`` naming a file ran the whole experiment, then failed writing its results in a bare
    ``NotADirectoryError``: the results directory is now made (or refused, naming it and the variable) before
    anything is computed."""
    E = experiment_script(name)
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    monkeypatch.setenv("QSGD_EXPERIMENT_OUT", str(blocker))
    monkeypatch.setattr(E, "run", never_run)
    with pytest.raises(SystemExit) as err:
        E.main(["scale=test"])
    msg = str(err.value.code)
    assert "QSGD_EXPERIMENT_OUT" in msg and str(blocker) in msg


def test_a_live_detector_names_a_path_whose_directory_cannot_be_made(tmp_path):
    """``LiveDetector(path="runs/a/events.json")`` with ``runs/a`` a file failed in a bare ``FileExistsError:
    [Errno 17] File exists: 'runs/a'``, naming neither the argument nor the path given: it is now a ValueError
    naming ``path``, raised when the detector is made (nothing written)."""
    from quotient_sgd.diagnostics import LiveDetector

    blocker = tmp_path / "a"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"LiveDetector: path=.*events\.json.* is not allowed: its directory"):
        LiveDetector(path=blocker / "events.json")
    with pytest.raises(ValueError, match=r"LiveDetector: path="):
        LiveDetector(path=blocker / "deeper" / "events.json")
    live = LiveDetector(path=tmp_path / "new" / "events.json", kinds=["divergence"])
    assert live.update({"loss": np.array([1.0, np.inf])})[0].kind == "divergence"
    assert (tmp_path / "new" / "events.json").is_file()


def test_save_events_names_a_path_that_is_a_directory_or_in_none_and_leaves_nothing_beside_it(tmp_path):
    """``save_events(a_directory, ...)`` wrote ``a_directory.tmp`` beside it and failed renaming it ("Is a
    directory: 'd.tmp' -> 'd'"); a path in a directory that does not exist failed naming the temporary
    ``events.json.tmp``.  Both now fail first, naming ``path``, and write nothing."""
    from quotient_sgd.diagnostics import Event, load_events, save_events

    d = tmp_path / "d"
    d.mkdir()
    with pytest.raises(IsADirectoryError, match=r"save_events: path=.* is a directory"):
        save_events(d, [])
    with pytest.raises(FileNotFoundError, match=r"save_events: path=.*events\.json.* its directory .* does not"):
        save_events(tmp_path / "missing" / "events.json", [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"] and list(d.iterdir()) == []
    e = Event(3, "divergence", float("inf"), {"loss": float("nan")}, details={"level": float("-inf")})
    save_events(d / "events.json", [e])
    (back,) = load_events(d / "events.json")
    assert back.step == 3 and back.strength == float("inf") and back.details["level"] == float("-inf")


@pytest.mark.parametrize("content, match", [
    ([{"kind": "fold"}], r"entry 0: Event\.from_dict: need a mapping with 'step', 'kind' and 'strength'"),
    ({"step": 1}, r"holds a dict; need a list of events"),
    ([{"step": 2.5, "kind": "fold", "strength": 1.0}], r"entry 0: Event\.from_dict: step=2\.5 is not allowed"),
    ([{"step": 2, "kind": "fold", "strength": "big"}], r"entry 0: Event\.from_dict: strength='big' is not allowed"),
])
def test_load_events_names_the_file_and_entry_that_is_not_an_event(content, match, tmp_path):
    """An ``events.json`` that is not a list of events failed in a bare ``KeyError: 'step'`` (or "dictionary update
    sequence element #0 has length 1"), a step 2.5 was read as 2 and a strength "big" failed in float(): each is now
    a ValueError naming the file, the entry and what is expected."""
    import json

    from quotient_sgd.diagnostics import load_events

    path = tmp_path / "events.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"load_events: .*events\.json.*" + match):
        load_events(path)


def test_stability_decomposition_names_a_key_that_is_not_a_prng_key():
    """``stability_decomposition(..., key="a")`` failed in jit's bare "Error interpreting argument to <function
    _decomposition ...> as an abstract array"; a key that is not an array is now a TypeError naming
    ``stability_decomposition`` and ``key`` (checked before anything is traced)."""
    import jax.numpy as jnp
    from flax import nnx

    from quotient_sgd import models
    from quotient_sgd.diagnostics import stability_decomposition

    model = models.MLP(2, (3,), 1, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, p)(jnp.ones((4, 2))) ** 2)

    for key in ("a", None, 0):
        with pytest.raises(TypeError, match=r"stability_decomposition: key=.* is not allowed; need one PRNG key"):
            stability_decomposition(loss, model.symmetries(), params, key=key)


def test_a_loss_array_given_as_the_trajectory_is_refused_naming_what_is_needed():
    """``detect(loss)`` (the loss array itself) was reported as "a trajectory needs at least the 'loss' key; got
    keys ['']"; every entry point now says the trajectory must be a mapping, e.g. ``{'loss': loss}``."""
    from quotient_sgd.diagnostics import LiveDetector, default_transition_keys, detect, detect_loss_spike

    loss = np.linspace(1.0, 0.1, 20)
    calls = {"detect": lambda: detect(loss), "LiveDetector.update": lambda: LiveDetector().update(loss),
             "default_transition_keys": lambda: default_transition_keys(loss),
             "detect_loss_spike": lambda: detect_loss_spike(list(loss), steps=np.arange(20))}
    for name, call in calls.items():
        with pytest.raises(TypeError, match=rf"{name}: the trajectory must be a mapping of per-step series, e\.g\. "
                                            r"\{'loss': loss\}"):
            call()
    assert detect({"loss": loss}) == []


def test_the_decomposition_names_a_group_that_is_not_one_and_swapped_arguments():
    """``gauge_transport("x", ...)`` or with a loss function as the group failed in a bare "'str' object has no
    attribute 'canonical_element'", and ``stability_decomposition(group, loss_fn, params)`` (swapped) in JAX's
    "Expected a callable value, got Product(...)": each is now a TypeError naming the function and the argument."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from quotient_sgd import models
    from quotient_sgd.diagnostics import gauge_transport, stability_decomposition

    model = models.MLP(2, (3,), 1, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    group = model.symmetries()

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, p)(jnp.ones((4, 2))) ** 2)

    for bad in ("x", loss):
        with pytest.raises(TypeError, match=r"gauge_transport\(group, params, v_canonical\): group must be a "
                                            r"symmetry group"):
            gauge_transport(bad, params, params)
    with pytest.raises(TypeError, match=r"stability_decomposition\(loss_fn, group, params, \.\.\.\): loss_fn must "
                                        r"be a function .* \(a symmetry group: the loss function comes first\)"):
        stability_decomposition(group, loss, params, key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"stability_decomposition\(loss_fn, group, params, \.\.\.\): group must be"):
        stability_decomposition(loss, "x", params, key=jax.random.key(0))


def test_steps_past_float64s_integers_are_refused_by_name():
    """``detect(..., start_step=2**63)`` failed in a bare OverflowError ("Python int too large to convert to C
    long"), and a ``step`` key or ``start_step`` near 2**62 (accepted) lost its step differences in float64, where
    the transition detector divides rates by them: 2**62 + 1 - 2**62 was 0, every block NaN with a RuntimeWarning,
    nothing monitored.  Steps of magnitude 2**53 or more are now refused naming ``start_step`` / ``step``."""
    import warnings

    from quotient_sgd.diagnostics import LiveDetector, detect

    loss = np.linspace(1.0, 0.5, 30)
    for s in (2**62, 2**63, -(2**63) - 1, 2**53 - 29):
        with pytest.raises(ValueError, match=r"detect: start_step=.* is not allowed; need an integer .* < 2\*\*53"):
            detect({"loss": loss}, start_step=s)
    with pytest.raises(ValueError, match=r"'step' key must hold integer step numbers \(finite, of magnitude < 2\*\*53"):
        detect({"loss": loss, "step": 2**62 + np.arange(30)})
    with pytest.raises(ValueError, match=r"LiveDetector: start_step=.* < 2\*\*53"):
        LiveDetector(start_step=2**64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert detect({"loss": loss}, start_step=2**53 - 30) == []


@pytest.mark.parametrize("model", ["[1]", '[["hidden=[8]"]]', "[null]"])
def test_hj_slices_refuses_a_model_override_that_is_not_text_by_name(model, tmp_path, monkeypatch):
    """``experiments/hj_slices.py model=[1]`` at the CPU scale (whose default ``model=()`` gives no element type to
    check against) failed in a bare "TypeError: argument of type 'int' is not iterable": each entry that is not a
    ``key=value`` string is now refused naming ``model``, before anything is computed."""
    E = experiment_script("hj_slices")
    monkeypatch.setenv("QSGD_EXPERIMENT_OUT", str(tmp_path))
    monkeypatch.setattr(E, "run", never_run)
    with pytest.raises(SystemExit) as err:
        E.main([f"model={model}"])
    assert "hj_slices: model=" in str(err.value.code) and "is not a key=value override" in str(err.value.code)
