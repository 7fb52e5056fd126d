"""train(): one jitted scan; vmap over hyperparameters; chunking; batch_fn; NNX state threading."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from quotient_sgd.optim import member_axes, quotient_trajectory, set_hyperparams, train
from quotient_sgd.symmetry import Product, Rescale


def _init(key, sizes=(3, 6, 2)):
    ks = jax.random.split(key, len(sizes))
    return {f"l{i}": {"kernel": jax.random.normal(ks[i], (a, b)) / np.sqrt(a), "bias": jnp.zeros((b,))}
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}


def _apply(p, x):
    h = jax.nn.relu(x @ p["l0"]["kernel"] + p["l0"]["bias"][None, :])
    return h @ p["l1"]["kernel"] + p["l1"]["bias"][None, :]


def mse(p, batch):
    x, y = batch
    return jnp.mean(jnp.square(_apply(p, x) - y))


GROUP = Product((Rescale(incoming=((("l0", "kernel"), 1), (("l0", "bias"), 0)), outgoing=((("l1", "kernel"), 0),),
                         name="r0"),))
X = jax.random.normal(jax.random.key(1), (64, 3))
Y = jnp.stack([jnp.sin(X[:, 0]), X[:, 1] * X[:, 2]], axis=1)


def batch_fn(step, key):
    idx = jax.random.choice(key, 64, (16,), replace=False)
    return X[idx], Y[idx]


def test_vmap_over_learning_rates_equals_separate_runs():
    lrs = jnp.linspace(0.01, 0.2, 8)
    tx = quotient_trajectory(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9), GROUP,
                             observables=("loss", "grad_norm", "effective_lr"))
    params = _init(jax.random.key(0))
    states = jax.vmap(lambda lr: set_hyperparams(tx.init(params), learning_rate=lr))(lrs)
    run = lambda s: train(mse, params, tx, batch_fn, num_steps=20, opt_state=s, donate=False)  # noqa: E731
    pv, _, tv = jax.vmap(run)(states)
    for i in range(8):
        pi, _, ti = run(jax.tree.map(lambda a: a[i], states))
        np.testing.assert_allclose(tv["loss"][i], ti["loss"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(tv["effective_lr"]["r0"][i], ti["effective_lr"]["r0"], rtol=1e-4, atol=1e-7)
        for a, b in zip(jax.tree.leaves(pv), jax.tree.leaves(pi)):
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6)
    assert len({float(v) for v in tv["loss"][:, -1]}) == 8


def _eqns(jaxpr, inside_cond=False):
    from jax.extend.core import jaxprs_in_params

    for e in jaxpr.eqns:
        yield e, inside_cond
        for sub in jaxprs_in_params(e.params):
            yield from _eqns(sub, inside_cond or e.primitive.name == "cond")


def test_member_axes_keep_periodic_observables_branches_under_vmap():
    """With ``member_axes`` the step counters stay unbatched in a vmapped sweep: the Hessian every 5 steps is a
    ``cond`` on a scalar, its Lanczos (``eigh``) only inside the branch, and the members equal their own runs.
    With every leaf batched (the control) vmap turns the cond into a select that runs the Lanczos every step."""
    lrs = jnp.array([0.05, 0.2])
    tx = quotient_trajectory(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), GROUP, observables=("loss",),
                             hessian_every=5, hessian_at=("horizontal",), lanczos_steps=3)
    params = _init(jax.random.key(0))
    axes = member_axes(tx.init(params))
    assert jax.tree.leaves(axes) and None in jax.tree.leaves(axes, is_leaf=lambda a: a is None)
    states = jax.vmap(lambda lr: set_hyperparams(tx.init(params), learning_rate=lr), out_axes=axes)(lrs)
    run = lambda s: train(mse, params, tx, batch_fn, num_steps=7, opt_state=s, donate=False)  # noqa: E731
    for in_axes, branches in ((axes, True), (0, False)):
        jaxpr = jax.make_jaxpr(jax.vmap(run, in_axes=(in_axes,)))(
            states if branches else jax.vmap(lambda lr: set_hyperparams(tx.init(params), learning_rate=lr))(lrs))
        eighs = [inside for e, inside in _eqns(jaxpr.jaxpr) if e.primitive.name == "eigh"]
        assert eighs and all(eighs) == branches
    _, _, tv = jax.vmap(run, in_axes=(axes,))(states)
    for i, lr in enumerate(lrs):
        _, _, ti = run(set_hyperparams(tx.init(params), learning_rate=lr))
        for k in ("loss", "sharpness_horizontal", "hessian_step"):
            np.testing.assert_allclose(tv[k][i], ti[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_chunked_equals_unchunked_and_stacked_data():
    tx = quotient_trajectory(optax.sgd(0.05, momentum=0.9), GROUP, observables=("loss", "curvature", "charges"))
    params = _init(jax.random.key(0))
    p_full, s_full, t_full = train(mse, params, tx, batch_fn, num_steps=12, donate=False)
    p, s, t1 = train(mse, params, tx, batch_fn, num_steps=5, donate=False)
    p, s, t2 = train(mse, p, tx, batch_fn, num_steps=7, opt_state=s, start_step=5)  # donated
    np.testing.assert_allclose(jnp.concatenate([t1["curvature"], t2["curvature"]]), t_full["curvature"],
                               rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_full)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # stacked data = the same batches materialised
    keys = jax.random.key(0)
    stacked = jax.vmap(lambda i: batch_fn(i, jax.random.fold_in(keys, i)))(jnp.arange(12))
    p_st, _, t_st = train(mse, params, tx, stacked, donate=False)
    np.testing.assert_allclose(t_st["loss"], t_full["loss"], rtol=1e-6)


def test_vmap_over_seeds_and_has_aux():
    def loss_aux(p, batch):
        out = _apply(p, batch[0])
        return jnp.mean(jnp.square(out - batch[1])), jnp.mean(out)

    params = jax.vmap(_init)(jax.random.split(jax.random.key(0), 3))
    keys = jax.random.split(jax.random.key(1), 3)
    _, _, traj = jax.vmap(lambda p, k: train(loss_aux, p, optax.sgd(0.05), batch_fn, num_steps=4, key=k,
                                             has_aux=True, donate=False))(params, keys)
    assert traj["loss"].shape == (3, 4) and traj["aux"].shape == (3, 4)


class _BNModel(nnx.Module):
    """Linear -> batch-statistics normalisation (running mean in a BatchStat) -> ReLU -> Linear."""

    def __init__(self, rngs):
        self.l0 = nnx.Linear(3, 6, rngs=rngs)
        self.l1 = nnx.Linear(6, 2, rngs=rngs)
        self.mean = nnx.BatchStat(jnp.zeros((6,)))

    def __call__(self, x):
        h = self.l0(x)
        m = jnp.mean(h, axis=0)
        self.mean.value = 0.9 * self.mean.value + 0.1 * m
        return self.l1(jax.nn.relu(h - m[None, :]))


def test_nnx_model_state_threaded():
    model = _BNModel(nnx.Rngs(0))
    graphdef, params, bstats = nnx.split(model, nnx.Param, nnx.BatchStat)

    def loss_fn(p, ms, batch):
        m = nnx.merge(graphdef, p, ms)
        out = m(batch[0])
        _, _, new_ms = nnx.split(m, nnx.Param, nnx.BatchStat)
        return jnp.mean(jnp.square(out - batch[1])), (None, new_ms)

    tx = optax.sgd(0.05)
    p, s, ms, traj = train(loss_fn, params, tx, batch_fn, num_steps=6, model_state=bstats, donate=False)
    # reference: a plain Python loop
    pr, sr, msr = params, tx.init(params), bstats
    key = jax.random.key(0)

    @jax.jit  # (op by op, the first step compiled each op of the model, its gradient and the update)
    def reference_step(pr, sr, msr, i):
        batch = batch_fn(i, jax.random.fold_in(key, i))
        fresh = lambda p, ms, b: loss_fn(p, jax.tree.map(lambda a: a, ms), b)  # noqa: E731  (see train)
        (l, (_, msr2)), g = jax.value_and_grad(fresh, has_aux=True)(pr, msr, batch)
        u, sr = tx.update(g, sr, pr)
        return optax.apply_updates(pr, u), sr, msr2, l

    for i in range(6):
        pr, sr, msr, l = reference_step(pr, sr, msr, jnp.int32(i))
        np.testing.assert_allclose(traj["loss"][i], l, rtol=1e-5)
    np.testing.assert_allclose(ms["mean"].value, msr["mean"].value, rtol=1e-5, atol=1e-7)
    assert float(jnp.max(jnp.abs(ms["mean"].value))) > 0


def test_errors_are_clear():
    with pytest.raises(ValueError, match="num_steps"):
        train(mse, _init(jax.random.key(0)), optax.sgd(0.1), batch_fn)
    tx = quotient_trajectory(optax.sgd(0.1), GROUP, hessian_every=2)
    p = _init(jax.random.key(0))
    with pytest.raises(ValueError, match="loss_fn"):
        tx.update(p, tx.init(p), p)


def test_bad_loss_conventions_and_arguments_name_themselves():
    """A loss_fn whose return value does not match has_aux / model_state, a non-scalar loss, and bad num_steps /
    start_step / data fail with a ValueError naming the argument (they were JAX errors from inside grad or scan,
    or, for a float start_step, a silent truncation)."""
    p = _init(jax.random.key(0))
    aux_loss = lambda p, b: (mse(p, b), {"n": jnp.int32(1)})  # noqa: E731
    cases = [
        (dict(loss_fn=aux_loss), r"returned a tuple of 2 .* pass has_aux=True"),
        (dict(has_aux=True), r"has_aux=True.* must return \(loss, aux\), got an array of shape \(\)"),
        (dict(loss_fn=lambda p, b: jnp.square(_apply(p, b[0]) - b[1])), r"must be a scalar, got shape \(16, 2\)"),
        (dict(loss_fn=lambda p, ms, b: mse(p, b), model_state={"m": jnp.zeros(())}),
         r"model_state=.* must return \(loss, \(aux, new_model_state\)\)"),
        (dict(num_steps=-1), "num_steps must be None .* or an integer >= 0, got -1"),
        (dict(num_steps=2.0), "num_steps must be None .* or an integer >= 0, got 2.0"),
        (dict(start_step=1.5), "start_step must be an integer"),
        (dict(data=(X[None].repeat(2, 0), Y[None].repeat(3, 0))), r"same leading \(step\) axis"),
    ]
    for kw, match in cases:
        kw = dict(dict(loss_fn=mse, data=batch_fn, num_steps=2), **kw)
        with pytest.raises(ValueError, match=match):
            train(kw.pop("loss_fn"), p, optax.sgd(0.1), kw.pop("data"), donate=False, **kw)
    # integer scalars of any kind are fine as start_step
    a = train(mse, p, optax.sgd(0.1), batch_fn, num_steps=2, start_step=np.int64(3), donate=False)[2]
    b = train(mse, p, optax.sgd(0.1), batch_fn, num_steps=2, start_step=jnp.int32(3), donate=False)[2]
    np.testing.assert_array_equal(a["loss"], b["loss"])


def test_set_hyperparams_refuses_to_truncate_an_integer_injection():
    """optax.inject_hyperparams keeps a Python int (momentum=0) as an int32: a float set there was cast to 0
    silently (a sweep over momenta ran them all at 0); now a ValueError naming it.  Ints and floats into float
    slots still work, also traced under vmap."""
    p = _init(jax.random.key(0))
    state = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0).init(p)
    with pytest.raises(ValueError, match=r"momentum was injected as an integer .* inject a float \(momentum=0.0"):
        set_hyperparams(state, momentum=0.9)
    with pytest.raises(ValueError, match="momentum was injected as an integer"):
        jax.vmap(lambda m: set_hyperparams(state, momentum=m))(jnp.array([0.5, 0.9]))
    assert int(set_hyperparams(state, momentum=1).hyperparams["momentum"]) == 1
    lrs = jax.vmap(lambda lr: set_hyperparams(state, learning_rate=lr))(jnp.array([0.5, 2.0])).hyperparams
    np.testing.assert_allclose(lrs["learning_rate"], [0.5, 2.0])
    assert float(set_hyperparams(state, learning_rate=1).hyperparams["learning_rate"]) == 1.0


def test_reusing_donated_inputs_is_a_clear_error():
    """train donates its inputs by default: calling it again with the same (now deleted) arrays names the
    argument and the ways out, instead of JAX's 'Array has been deleted'; donate=False keeps them usable and
    the second run equals the first."""
    p = _init(jax.random.key(0))
    kept = jax.tree.map(jnp.copy, p)
    tx = optax.sgd(0.1, momentum=0.9)
    p1, s1, _ = train(mse, p, tx, batch_fn, num_steps=3)
    with pytest.raises(ValueError, match=r"params holds arrays that were donated .* donate=False"):
        train(mse, p, tx, batch_fn, num_steps=3)
    train(mse, p1, tx, batch_fn, num_steps=3, opt_state=s1)  # consumes p1 and s1
    with pytest.raises(ValueError, match=r"opt_state holds arrays that were donated"):
        train(mse, jax.tree.map(jnp.copy, kept), tx, batch_fn, num_steps=3, opt_state=s1)
    a = train(mse, kept, tx, batch_fn, num_steps=3, donate=False)[0]
    b = train(mse, kept, tx, batch_fn, num_steps=3, donate=False)[0]
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))


def test_wrappers_name_a_wrong_tx_or_group():
    from quotient_sgd.optim import SGDSpec, gauge_fix, horizontal

    for wrap in (quotient_trajectory, horizontal, gauge_fix):
        with pytest.raises(TypeError, match=f"{wrap.__name__}: tx must be an optax.GradientTransformation"):
            wrap(0.1, GROUP)
        with pytest.raises(TypeError, match=f"{wrap.__name__}: group must be a quotient_sgd.symmetry.Group"):
            wrap(optax.sgd(0.1), "rescale")
    for field in ("learning_rate", "weight_decay", "momentum", "coupled_weight_decay"):
        kw = {"learning_rate": 0.1, field: -0.5}
        with pytest.raises(ValueError, match=f"SGDSpec: {field}=-0.5 is not allowed"):
            SGDSpec(**kw)
    assert SGDSpec("learning_rate", momentum="momentum").momentum == "momentum"  # names of injected values pass
