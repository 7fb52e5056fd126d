"""Probes of what README.md and the docstrings promise, each against the code that keeps the promise."""

import pytest

from quotient_sgd import observables


def test_kind_of_reads_the_flattened_keys_of_a_run_directory():
    # trajectory.npz holds "/"-joined keys (README: ``charges/<component>``); each has its observable's kind
    assert observables.kind_of("charges/rescale/layers.0") == observables.kind_of("charges") == "reduced_dynamics"
    assert observables.kind_of("invariant_norms/rescale/layers.0") == "orbit_invariant"
    assert observables.kind_of("sharpness_raw") == "raw"
    with pytest.raises(KeyError, match="no_such_observable"):
        observables.kind_of("no_such_observable/x")


_SLOW = pytest.mark.slow  # a model's first call compiles its layers: several seconds each


@pytest.mark.parametrize("module", [
    "quotient_sgd.hj._grid", "quotient_sgd.hj._cole_hopf", "quotient_sgd.data._dataset",
    "quotient_sgd.diagnostics._detect", "quotient_sgd.diagnostics._shock_lr", "quotient_sgd.diagnostics._live",
    pytest.param("quotient_sgd.models._mlp", marks=_SLOW), pytest.param("quotient_sgd.models._cnn", marks=_SLOW),
    pytest.param("quotient_sgd.models._transformer", marks=_SLOW),
])
def test_docstring_examples_run_as_written(module):
    # the examples of the public docstrings print what they claim, without a warning
    import doctest
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS, report=True)
    assert result.attempted > 0 and result.failed == 0, result


@pytest.mark.parametrize("fn", ["stability_edge", "fold_edge", "fold_levels_for"])
@pytest.mark.parametrize("bad", [dict(momentum=1.0), dict(momentum=1.5), dict(momentum=-0.1),
                                 dict(momentum="0.9"), dict(momentum=0.9, nesterov="yes")])
def test_momentum_edges_refuse_a_momentum_outside_its_range(fn, bad):
    # as adam_edge refuses b1 outside [0, 1) and detect refuses momentum=1.0: beta = 1 is never stable, so the
    # 2 (1 + beta) = 4 that stability_edge(1.0) returned was no edge at all
    from quotient_sgd import diagnostics

    f = getattr(diagnostics, fn)
    args = ((1.0, 2.0),) if fn == "fold_levels_for" else ()
    name = "nesterov" if "nesterov" in bad else "momentum"
    with pytest.raises(ValueError, match=f"{name}="):
        f(*args, **bad)


def test_momentum_edges_keep_their_values_in_range():
    from quotient_sgd import diagnostics

    for b in (0.0, 0.5, 0.9):
        assert diagnostics.stability_edge(b) == pytest.approx(2 * (1 + b))
        assert diagnostics.stability_edge(b, True) == pytest.approx(2 * (1 + b) / (1 + 2 * b))
        assert diagnostics.fold_edge(b) == pytest.approx(1 + b) and diagnostics.fold_edge(b, True) == 1.0
        assert diagnostics.fold_levels_for((1.0, 2.0), b) == pytest.approx([1 + b, 2 * (1 + b)])


def test_divergence_needs_the_loss_high_for_twenty_consecutive_steps():
    # README's detector table: non-finite loss, or loss > 100 x initial for 20 consecutive steps
    import numpy as np

    from quotient_sgd.diagnostics import detect

    def events(n_high):
        loss = np.r_[np.ones(30), np.full(n_high, 500.0), np.ones(30)]
        return [(e.step, e.kind) for e in detect({"loss": loss}, kinds=["divergence"])]

    assert events(19) == []
    assert events(20) == [(30, "divergence")]
    assert [e.step for e in detect({"loss": np.r_[np.ones(5), np.nan]}, kinds=["divergence"])] == [5]


def _one_unit(a, b):
    """A 1-1-1 linear network with ``|w_in| = a``, ``|w_out| = b`` (float64), its graphdef and group."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from quotient_sgd import models

    model = models.DeepLinear(1, (1,), 1, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    treedef = jax.tree.structure(params)
    return graphdef, jax.tree.unflatten(treedef, [jnp.full((1, 1), a), jnp.full((1, 1), b)]), model.symmetries()


def test_gauge_transport_of_one_unit_gives_the_charge_formula(x64):
    # README (THEORY section 4): gauge_factor_charges = |J_k^T v_c|^2 / |v_c|^2, for one unit |w_in| = a,
    # |w_out| = b exactly (a^2 + b^2) / (2 a b) = sqrt(Q^2 + m^2) / m, v_c the unit's direction at the balanced point
    import jax
    import jax.numpy as jnp

    from quotient_sgd import diagnostics

    a, b = 2.0, 0.5
    _, params, group = _one_unit(a, b)
    v_c = jax.tree.map(lambda x: jnp.full_like(x, 2 ** -0.5), params)
    u = diagnostics.gauge_transport(group, params, v_c)
    q, m = (a * a - b * b) / 2, a * b
    assert sum(float(jnp.sum(x * x)) for x in jax.tree.leaves(u)) == pytest.approx((q * q + m * m) ** 0.5 / m,
                                                                                   rel=1e-12)


@pytest.mark.slow
def test_gauge_factor_of_one_unit_at_a_critical_point_is_the_charge_formula(x64):
    # README (THEORY section 4): lambda_step = lambda_canonical * gauge_factor, and for one unit |w_in| = a,
    # |w_out| = b at a critical point gauge_factor = (a^2 + b^2) / (2 a b) = sqrt(Q^2 + m^2) / m exactly
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from quotient_sgd import diagnostics

    a, b = 2.0, 0.5
    graphdef, params, group = _one_unit(a, b)
    x, y = jnp.ones((1, 1)), jnp.full((1, 1), a * b)

    def loss_fn(p):
        return 0.5 * jnp.sum((nnx.merge(graphdef, p)(x) - y) ** 2)

    out = diagnostics.stability_decomposition(loss_fn, group, params, 0.1, key=jax.random.key(0),
                                              num_matvecs=1, raw=False)
    q, m = (a * a - b * b) / 2, a * b
    assert float(out["sharpness_horizontal"]) == pytest.approx(a * a + b * b, rel=1e-12)
    assert float(out["sharpness_quotient"]) == pytest.approx(2 * a * b, rel=1e-12)
    assert float(out["gauge_factor"]) == pytest.approx((q * q + m * m) ** 0.5 / m, rel=1e-12)
    assert float(out["gauge_factor_charges"]) == pytest.approx((a * a + b * b) / (2 * a * b), rel=1e-12)


def test_events_round_trip_through_strict_json(tmp_path):
    # Event.to_dict: JSON-serialisable, non-finite floats as strings (strict JSON), read back by load_events
    import json

    import numpy as np

    from quotient_sgd.diagnostics import Event, detect, load_events, save_events

    events = detect({"loss": np.r_[np.ones(5), np.nan]}, kinds=["divergence"])
    events.append(Event(3, "shock", float("-inf"), {"curvature": np.float32(-2.5)}, "step", False, {"n": np.int64(2)}))
    path = tmp_path / "events.json"
    save_events(path, events)
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    back = load_events(path)
    assert [e.to_dict() for e in back] == [e.to_dict() for e in events]
    assert back[0].strength == np.inf and np.isnan(back[0].observables["loss"]) and back[1].strength == -np.inf


def test_readme_lists_every_observable_with_its_kind():
    # README's "Observables and their kind" bullet names every key of observables.KINDS under its kind
    import pathlib
    import re

    import quotient_sgd.optim  # noqa: F401  (registers the trajectory's own keys)
    from quotient_sgd.observables import KINDS

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    bullet = re.search(r"- Observables and their kind.*?(?=\n- )", text, re.S).group(0)
    sections = {"orbit_invariant": bullet.split("orbit invariants")[1].split("reduced-dynamics")[0],
                "reduced_dynamics": bullet.split("reduced-dynamics")[1].split("; raw")[0],
                "raw": bullet.split("; raw")[1]}
    listed = {k: set(re.findall(r"`([a-z_0-9]+)`", v)) for k, v in sections.items()}
    assert {key: kind for kind, keys in listed.items() for key in keys} == KINDS


def test_mlp_computes_its_docstring_formula():
    # MLP's docstring: f(x) = sigma(... sigma(x W_1 + b_1) ...) W_L + b_L, Flax kernels (din, dout)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from quotient_sgd.models import MLP

    model = MLP(2, (3, 4), 2, activation="tanh", rngs=nnx.Rngs(0))
    layers = [(np.asarray(layer.kernel[...]), np.asarray(layer.bias[...])) for layer in model.layers]
    layers = [(w, b + 0.1 * np.arange(b.size, dtype=b.dtype)) for w, b in layers]  # nonzero biases
    for layer, (w, b) in zip(model.layers, layers):
        layer.bias[...] = jnp.asarray(b)
    x = jax.random.normal(jax.random.key(1), (5, 2))
    h = np.asarray(x)
    for w, b in layers[:-1]:
        h = np.tanh(h @ w + b)
    graphdef, state = nnx.split(model)
    out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)  # one compilation, not one per op
    np.testing.assert_allclose(np.asarray(out), h @ layers[-1][0] + layers[-1][1], rtol=1e-5, atol=1e-6)


def test_a_spec_naming_no_injected_hyperparameter_is_refused_at_init():
    # SGDSpec fields name injected hyperparameters; a wrong name raised only at the first update (inside train's
    # trace), the misspelling found after the program was built: init refuses it now, naming what is injected
    import jax.numpy as jnp
    import optax

    from quotient_sgd.optim import SGDSpec, quotient_trajectory
    from quotient_sgd.symmetry import Scale

    group = Scale(members=((("w",), None),), name="scale/w")
    params = {"w": jnp.ones((3,))}
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
    with pytest.raises(KeyError, match=r"learning_rate='lr'.*injected: \['learning_rate', 'momentum'"):
        quotient_trajectory(sgd, group, spec=SGDSpec("lr"), observables=("loss",)).init(params)
    with pytest.raises(KeyError, match=r"momentum='beta'"):
        quotient_trajectory(sgd, group, spec=SGDSpec("learning_rate", momentum="beta"),
                            observables=("loss",)).init(params)
    with pytest.raises(KeyError, match=r"injected: \[\]"):
        quotient_trajectory(optax.sgd(0.1), group, spec=SGDSpec("learning_rate"), observables=("loss",)).init(params)
    quotient_trajectory(sgd, group, spec=SGDSpec("learning_rate", momentum="momentum"),
                        observables=("loss",)).init(params)
