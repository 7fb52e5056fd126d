"""Transition detection on a loss that reaches exactly 0.0 (a float32 cross-entropy that saturates)."""

import numpy as np

from quotient_sgd.diagnostics import LiveDetector, detect


def _loss_whose_rate_jumps(n=1000, seed=0):
    """A noisy loss whose decay rate jumps ten-fold at step 400 (one change point, found at step 410)."""
    rng = np.random.default_rng(seed)
    r = np.where(np.arange(n) < 400, 0.002, 0.02)
    return np.exp(-np.cumsum(r * (1 + 0.5 * rng.standard_normal(n))))


def test_a_loss_that_reaches_exactly_zero_keeps_the_change_points_before_it():
    """The default transform was ``log_diff`` only when every value was > 0: one exact 0.0 at the last step turned
    the whole run to raw differences, moving the change point at step 400 from step 410 (onset 391) to 420 (onset
    401), and a live detector, which had read the chunks before the zero by their log-rate, reported both (410 and
    420) where one detect call on the run reports one.  Now a series without negative values is read by its
    log-rate with its zeros skipped like non-finite values: the same events with and without the zero, live and
    offline."""
    loss = _loss_whose_rate_jumps()
    zero = loss.copy()
    zero[-1] = 0.0
    ref = detect({"loss": loss}, kinds=["transition"], horizon=len(loss))
    assert [e.step for e in ref] and all(e.details["transform"] == "log_diff" for e in ref)
    got = detect({"loss": zero}, kinds=["transition"], horizon=len(loss))
    assert [e.to_dict() for e in got] == [e.to_dict() for e in ref]
    live = LiveDetector(kinds=["transition"], horizon=len(loss))
    for i in range(0, len(zero), 100):
        live.update({"loss": zero[i:i + 100]})
    assert [e.to_dict() for e in live.events] == [e.to_dict() for e in got]


def test_a_series_with_negative_values_or_only_zeros_is_still_read_by_its_differences():
    """The log-rate needs positive values: a loss that goes negative (a negative log-likelihood) and a series of
    zeros keep ``diff``."""
    loss = _loss_whose_rate_jumps() - 0.5
    ev = detect({"loss": loss}, kinds=["transition"], transition_keys=["loss"])
    assert ev and all(e.details["transform"] == "diff" for e in ev)
    assert detect({"loss": np.zeros(300)}, kinds=["transition"]) == []


def test_a_live_detector_pickled_mid_run_goes_on_as_one_detect_call_on_the_whole_run(tmp_path):
    """A run resumed in another process continues its live detection from the pickled detector: no event lost or
    reported twice, and its events file is that of the whole run."""
    import pickle

    from quotient_sgd.diagnostics import load_events

    rng = np.random.default_rng(0)
    n = 600
    loss = _loss_whose_rate_jumps(n)
    loss[100:105] *= 5
    sharp = 2.0 + 0.02 * rng.standard_normal(n)
    sharp[104:] *= 0.5
    traj = {"loss": loss, "sharpness_quotient": sharp, "fold_number": 1.5 + 0.6 * np.sin(np.arange(n) / 7)}
    path = tmp_path / "events.json"
    live = LiveDetector(lr=1.0, horizon=n, path=path)
    for i in range(0, 250, 50):
        live.update({k: v[i:i + 50] for k, v in traj.items()})
    live = pickle.loads(pickle.dumps(live))
    for i in range(250, n, 50):
        live.update({k: v[i:i + 50] for k, v in traj.items()})
    ref = [e.to_dict() for e in detect(traj, lr=1.0, horizon=n)]
    assert {e["kind"] for e in ref} >= {"catapult", "loss_spike", "fold", "edge_of_stability"}
    assert [e.to_dict() for e in live.events] == ref
    assert [e.to_dict() for e in load_events(path)] == ref


def _unit_mlp(dtype):
    from flax import nnx

    from quotient_sgd import models

    model = models.MLP(3, (4,), 1, param_dtype=dtype, rngs=nnx.Rngs(0))
    return nnx.split(model, nnx.Param)[1], model.symmetries()


def test_gauge_transport_names_a_vector_not_shaped_like_the_parameters():
    """A ``v_canonical`` of another structure or leaf shape failed in JAX's bare "unexpected tree structure" /
    "unexpected JAX type" of the VJP; now a ValueError names ``v_canonical`` (and the leaf)."""
    import jax
    import jax.numpy as jnp
    import pytest

    from quotient_sgd.diagnostics import gauge_transport

    params, group = _unit_mlp(jnp.float32)
    with pytest.raises(ValueError, match="v_canonical.*tree structure of params"):
        gauge_transport(group, params, jnp.ones(3))
    with pytest.raises(ValueError, match=r"v_canonical.*\['layers'\]\[0\]\['bias'\].*shape \(4, 1\)"):
        gauge_transport(group, params, jax.tree.map(lambda x: jnp.ones(x.shape + (1,)), params))


def test_gauge_transport_of_a_float32_vector_on_bfloat16_parameters_is_computed_in_float32():
    """A float32 vector (what float32 Lanczos gives on low-precision parameters) on bfloat16 parameters failed in
    the VJP's bare "expected bfloat16"; now the transport runs in float32, as the other observables of such
    parameters, and equals the one on the parameters cast to float32."""
    import jax
    import jax.numpy as jnp

    from quotient_sgd.diagnostics import gauge_transport

    params, group = _unit_mlp(jnp.bfloat16)
    v = jax.tree.map(lambda x: jnp.linspace(-1.0, 1.0, x.size, dtype=jnp.float32).reshape(x.shape), params)
    got = gauge_transport(group, params, v)
    ref = gauge_transport(group, jax.tree.map(lambda x: x.astype(jnp.float32), params), v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        assert a.dtype == jnp.float32
        assert jnp.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_default_transition_keys_reads_a_nested_trajectory_and_refuses_an_unknown_variant():
    """``default_transition_keys`` answered any variant but ``"raw"`` (``"bogus"``, ``"raws"``) with the quotient
    keys, and left out the ``invariant_norms`` of a nested trajectory as ``train`` returns it (``detect`` monitors
    them); now the variant is checked by name and the trajectory flattened."""
    import pytest

    from quotient_sgd.diagnostics import default_transition_keys

    traj = {"loss": np.ones(5), "grad_norm": np.ones(5), "grad_norm_canonical": np.ones(5),
            "invariant_norms": {"rescale/layers.0": np.ones(5)}}
    assert default_transition_keys(traj) == ["loss", "grad_norm_canonical", "invariant_norms/rescale/layers.0"]
    assert default_transition_keys(traj, "raw") == ["grad_norm"]
    for bad in ("raws", "step", None):
        with pytest.raises(ValueError, match="variant.*'quotient' or 'raw'"):
            default_transition_keys(traj, bad)


def test_the_per_kind_detectors_take_a_learning_rate_given_once_as_detect_does():
    """``detect_edge_of_stability``, ``detect_fold`` (with weight decay) and ``detect_shock`` (slice shocks), public
    as ``detect``'s per-kind detectors, failed with a bare TypeError / IndexError / AttributeError for ``lr=0.1``
    (they indexed it per row); now a number is broadcast and checked as ``detect`` does, with the same events."""
    import pytest

    from quotient_sgd import diagnostics as D

    n = 50
    traj = {"loss": np.exp(-np.arange(n) / 10.0), "sharpness_quotient": np.linspace(1, 30, n),
            "fold_number": np.linspace(0, 3, n)}
    steps = np.arange(n)
    one = np.full(n, 0.1)
    for fn, kw in ((D.detect_edge_of_stability, {}), (D.detect_fold, {"weight_decay": 0.1}),
                   (D.detect_shock, {"slice_shocks": [{"step": 3, "shock_time": 0.5}]})):
        got = [e.to_dict() for e in fn(traj, steps=steps, lr=0.1, **kw)]
        assert got and got == [e.to_dict() for e in fn(traj, steps=steps, lr=one, **kw)]
    with pytest.raises(ValueError, match="lr='0.1' is not allowed"):
        D.detect_edge_of_stability(traj, steps=steps, lr="0.1")


def test_stability_decomposition_names_a_loss_that_is_not_one_number():
    """A per-example loss or a ``(loss, aux)`` pair failed in JAX's bare "Gradient only defined for scalar-output
    functions"; now a ValueError names ``loss_fn`` and what it returns."""
    import jax
    import jax.numpy as jnp
    import pytest
    from flax import nnx

    from quotient_sgd import models
    from quotient_sgd.diagnostics import stability_decomposition

    model = models.MLP(3, (2,), 1, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    per_example = lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2, axis=1)  # noqa: E731
    with pytest.raises(ValueError, match=r"loss_fn must return.*float32\[4\]"):
        stability_decomposition(per_example, model.symmetries(), params, key=jax.random.key(0), num_matvecs=2)
    with pytest.raises(ValueError, match="loss_fn must return"):
        stability_decomposition(lambda p: (jnp.mean(per_example(p)), 0.0), model.symmetries(), params,
                                key=jax.random.key(0), num_matvecs=2)


def test_the_per_kind_detectors_check_their_options_by_name_as_detect_does():
    """Called directly, a per-kind detector took a misspelt option (``fold_level=``) into ``**_`` without a word
    and used one out of range as it came (``spike_factor=0.5``, ``rearm=5``); ``detect`` refused both.  Now the
    per-kind detectors check them the same way, and read a nested trajectory and a list of steps."""
    import pytest

    from quotient_sgd import diagnostics as D

    n = 50
    traj = {"loss": np.exp(-np.arange(n) / 10.0), "fold_number": np.linspace(0, 3, n)}
    steps = np.arange(n)
    with pytest.raises(TypeError, match=r"detect_fold: unknown option\(s\) \['fold_level'\]"):
        D.detect_fold(traj, steps=steps, fold_level=(1.5,))
    with pytest.raises(ValueError, match="detect_loss_spike: spike_factor=0.5 is not allowed"):
        D.detect_loss_spike(traj, steps=steps, spike_factor=0.5)
    with pytest.raises(ValueError, match="detect_fold: rearm=5 is not allowed"):
        D.detect_fold(traj, steps=steps, rearm=5)
    got = D.detect_fold({"loss": traj["loss"], "fold_number": traj["fold_number"]}, steps=list(steps),
                        fold_levels=[1.5])
    assert [e.to_dict() for e in got] == [e.to_dict() for e in D.detect(traj, kinds=["fold"], fold_levels=[1.5])]


def test_a_live_detector_refuses_a_path_that_is_a_directory_when_it_is_made(tmp_path):
    """``LiveDetector(path=<a directory>)`` was made and failed at the first chunk in IsADirectoryError, after that
    chunk's events were kept; now it is refused when made, naming ``path`` and an events file in it."""
    import pytest

    with pytest.raises(ValueError, match="path=.* is a directory; need the path of the events file"):
        LiveDetector(path=tmp_path)
    live = LiveDetector(path=tmp_path / "events.json")
    assert [e.kind for e in live.update({"loss": np.array([1.0, 5.0])})] == ["loss_spike"]


def test_shock_aware_lr_refuses_a_target_schedule_whose_value_is_not_one_number():
    """A ``fold_target`` schedule returning shape (1,) turned the scale, and every scalar parameter it multiplied,
    into shape (1,) without a word; one returning shape (2,) failed in a bare broadcasting TypeError.  Now the
    value's shape is checked (known when traced) and a ValueError names the target; a scalar schedule runs."""
    import jax
    import jax.numpy as jnp
    import optax
    import pytest

    from quotient_sgd.diagnostics import shock_aware_lr

    params = {"a": jnp.ones(()), "b": jnp.ones(3)}
    grads = jax.tree.map(lambda x: 4.0 * x, params)
    for name in ("fold_target", "shock_target"):
        for shape in ((1,), (2,)):
            tx = shock_aware_lr(optax.sgd(0.5), **{name: lambda c, shape=shape: jnp.full(shape, 1.8)})
            with pytest.raises(ValueError, match=f"{name}=.*value has shape \\({shape[0]},\\)"):
                tx.update(grads, tx.init(params), params)
    tx = shock_aware_lr(optax.sgd(0.5), fold_target=optax.linear_schedule(1.0, 2.0, 10))
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params) and state.scale.shape == ()


def test_shock_aware_lr_passes_an_inner_update_only_the_extra_arguments_it_names():
    """``shock_aware_lr`` handed its inner optimiser every extra argument ``train`` passes: around
    ``optax.contrib.sam`` (whose update names ``grad_fn`` alone) it failed at the first step with "unexpected
    keyword argument 'value'".  The inner update now gets the extra arguments it names: ``train`` equals a
    hand-written loop that passes ``grad_fn`` alone."""
    import jax
    import jax.numpy as jnp
    import optax

    from quotient_sgd.diagnostics import shock_aware_lr
    from quotient_sgd.optim import train

    def loss(p, b):
        return jnp.sum((p["w"] * b - 1.0) ** 2)

    params = {"w": jnp.array([0.5, -1.0, 2.0])}
    batches = jnp.stack([jnp.array([1.0, 2.0, 0.5]) * (1 + 0.1 * k) for k in range(4)])
    tx = shock_aware_lr(optax.contrib.sam(optax.sgd(0.05), optax.sgd(0.02), sync_period=2))
    with jax.numpy_dtype_promotion("standard"):  # sam multiplies a bool by the parameters
        got, _, _ = train(loss, params, tx, batches, donate=False)
        p, state = params, tx.init(params)
        for b in batches:
            g = jax.grad(loss)(p, b)
            u, state = tx.update(g, state, p, grad_fn=lambda q, _, b=b: jax.grad(loss)(q, b))
            p = optax.apply_updates(p, u)
    np.testing.assert_allclose(got["w"], p["w"], rtol=1e-6)
    assert not np.allclose(got["w"], params["w"])
