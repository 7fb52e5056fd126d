"""gauge_fix equivariance and the horizontal projection transform."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from quotient_sgd.optim import gauge_fix, horizontal, quotient_trajectory, train
from quotient_sgd.symmetry import Product, Rescale, Translation

from helpers import permutation_gauge_case


def _init(key, sizes=(3, 6, 5, 3)):
    ks = jax.random.split(key, len(sizes))
    return {f"l{i}": {"kernel": jax.random.normal(ks[i], (a, b)) / np.sqrt(a),
                      "bias": 0.1 * jax.random.normal(jax.random.fold_in(ks[i], 1), (b,))}
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}


def _apply(p, x):
    n = len(p)
    for i in range(n):
        x = x @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"][None, :]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


GROUP = Product(
    [Rescale(incoming=(((f"l{i}", "kernel"), 1), ((f"l{i}", "bias"), 0)), outgoing=(((f"l{i + 1}", "kernel"), 0),),
             name=f"r{i}") for i in range(2)]
    + [Translation(kernel=("l2", "kernel"), bias=("l2", "bias"), name="t")]
)
X = jax.random.normal(jax.random.key(1), (10, 16, 3))
Y = jax.random.randint(jax.random.key(2), (10, 16), 0, 3)
PROBE = jax.random.normal(jax.random.key(3), (32, 3))


def loss_with_outputs(p, batch):
    x, y = batch
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(_apply(p, x), y))
    return loss, jax.nn.log_softmax(_apply(p, PROBE), axis=-1)


def test_gauge_fix_equivariance():
    """SGD + gauge_fix from params and from g.params computes the same function at every step; plain SGD does
    not (rescale is not an isometry)."""
    params = _init(jax.random.key(0))
    g = GROUP.sample(jax.random.key(5), params, scale=1.0)
    moved = GROUP.act(g, params)
    outs = {}
    for name, tx in (("fixed", gauge_fix(optax.sgd(0.2), GROUP)), ("plain", optax.sgd(0.2))):
        run = jax.jit(lambda p: train(loss_with_outputs, p, tx, (X, Y), has_aux=True, donate=False)[2]["aux"])  # noqa: B023
        outs[name] = (run(params), run(moved))
    a, b = outs["fixed"]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    a, b = outs["plain"]
    assert float(jnp.max(jnp.abs(a - b))) > 1e-2


def test_gauge_fix_every_and_function_unchanged():
    params = _init(jax.random.key(0))
    tx = gauge_fix(optax.sgd(0.0), GROUP, every=2)  # zero lr: only the re-gauging acts
    p1, _, _ = train(loss_with_outputs, params, tx, (X[:3], Y[:3]), has_aux=True, donate=False)
    # (translation shifts raw logits; jitted: op by op each layer's ops compiled)
    lsm = jax.jit(lambda p: jax.nn.log_softmax(_apply(p, PROBE), axis=-1))
    np.testing.assert_allclose(lsm(p1), lsm(params), rtol=1e-4, atol=1e-5)
    canon = GROUP.canonicalize(params)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(canon)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_horizontal_updates_are_horizontal():
    params = _init(jax.random.key(0))
    tx = quotient_trajectory(horizontal(optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.1, momentum=0.9)),
                                        GROUP), GROUP, observables=("update_vertical_norm", "update_horizontal_norm"))
    _, _, traj = train(loss_with_outputs, params, tx, (X, Y), has_aux=True, donate=False)
    assert float(jnp.max(traj["update_vertical_norm"] / traj["update_horizontal_norm"])) < 1e-4
    # without the projection weight decay and momentum drift along the orbit
    tx0 = quotient_trajectory(optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.1, momentum=0.9)), GROUP,
                              observables=("update_vertical_norm", "update_horizontal_norm"))
    _, _, traj0 = train(loss_with_outputs, params, tx0, (X, Y), has_aux=True, donate=False)
    assert float(jnp.max(traj0["update_vertical_norm"] / traj0["update_horizontal_norm"])) > 1e-2
    # direct check against the orbit tangents (one jitted program: op by op it dispatched ~100 small ops)
    tx1 = horizontal(optax.sgd(0.1, momentum=0.9), GROUP)

    @jax.jit
    def tangential(params):
        grads = jax.grad(lambda p: loss_with_outputs(p, (X[0], Y[0]))[0])(params)
        u, _ = tx1.update(grads, tx1.init(params), params)
        tang = jax.vmap(lambda t: ravel_pytree(t)[0])(GROUP.tangents(params))
        return jnp.max(jnp.abs(tang @ ravel_pytree(u)[0]))

    assert float(tangential(params)) < 1e-5


def test_gauge_fix_state_follows_unit_permutations(x64, monkeypatch):
    """The canonical sort reorders hidden units between steps; with momentum or Adam, gauge_fix permutes the
    optimiser state with them, so the run computes the same function (float64, every step) as gauge_fix on the
    group without the permutations.  Without the state permutation the two runs part (checked)."""
    from quotient_sgd.optim import _gauge

    full, noperm, outputs = permutation_gauge_case(30)
    assert len(noperm.components) < len(full.components)

    for tx in (optax.sgd(0.3, momentum=0.9), optax.adam(0.05)):
        with jax.numpy_dtype_promotion("standard"):  # optax.adam's bias correction mixes int32 and float
            np.testing.assert_allclose(outputs(tx, full), outputs(tx, noperm), rtol=1e-8, atol=1e-8)
    monkeypatch.setattr(_gauge, "_permute_state", lambda group, k, state, params: state)
    tx = optax.sgd(0.3, momentum=0.9)
    assert float(jnp.max(jnp.abs(outputs(tx, full) - outputs(tx, noperm)))) > 1e-3


def test_gauge_fix_moves_batch_statistics_with_the_parameters(x64):
    """A BatchNorm CNN under gauge_fix: the canonical element (channel scales *and* the channel sort) moves the
    running statistics through ``act_on_model_state``, so the evaluation-mode function is that of the un-fixed
    run (zero learning rate: only the re-gauging acts), and SGD + gauge_fix
    from ``(g . params, g . stats)`` gives the evaluation-mode function of the run from ``(params, stats)``.
    Without the action ``train`` refuses."""
    import functools

    from flax import nnx

    from quotient_sgd.models import CNN

    model = CNN(in_channels=1, channels=(4, 6), dout=3, norm="batch", rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    graphdef, params, stats = nnx.split(model, nnx.Param, ...)
    group = model.symmetries()
    x = jax.random.normal(jax.random.key(1), (4, 16, 6, 6, 1), jnp.float64)
    y = jax.random.randint(jax.random.key(2), (4, 16), 0, 3)

    def loss_fn(p, ms, batch):
        m = nnx.merge(graphdef, p, ms)
        loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(m(batch[0]), batch[1]))
        return loss, (None, nnx.split(m, nnx.Param, ...)[2])

    @jax.jit
    def evaluate(p, ms):
        m = nnx.merge(graphdef, p, ms)
        m.eval()
        return m(x[0])

    act = functools.partial(model.act_on_batch_stats, group)
    kw = dict(model_state=stats, act_on_model_state=act, donate=False)
    p0, _, ms0, _ = train(loss_fn, params, optax.sgd(0.0), (x, y), **kw)
    # every=2 over 4 steps: re-gauged at steps 0 and 2, a plain step in between (the branch that moves nothing)
    p, _, ms, _ = train(loss_fn, params, gauge_fix(optax.sgd(0.0), group, every=2), (x, y), **kw)
    # (in numpy: op by op, jnp compiled its three ops for every leaf shape)
    assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(jax.tree.leaves(p),
                                                                                     jax.tree.leaves(p0))) > 0.1
    np.testing.assert_allclose(evaluate(p, ms), evaluate(p0, ms0), rtol=1e-9, atol=1e-9)
    # the statistics left where they were: another function
    assert float(jnp.max(jnp.abs(evaluate(p, ms0) - evaluate(p0, ms0)))) > 1e-2

    gp, gstats = jax.jit(lambda k: (lambda g: (group.act(g, params), act(g, stats)))(group.sample(k, params, 1.0)))(
        jax.random.key(5))
    tx = gauge_fix(optax.sgd(0.1, momentum=0.9), group)
    a = train(loss_fn, params, tx, (x, y), **kw)
    b = train(loss_fn, gp, tx, (x, y), **dict(kw, model_state=gstats))
    np.testing.assert_allclose(evaluate(b[0], b[2]), evaluate(a[0], a[2]), rtol=1e-8, atol=1e-8)

    import pytest

    with pytest.raises(ValueError, match="act_on_model_state"):
        train(loss_fn, params, tx, (x, y), model_state=stats, donate=False)
