"""quotient_sgd.optim / observables on further inputs: SGD chains with clipping, schedules, accumulation and masks;
Lanczos extremes at every evaluation step; honest kinds on a normalised CNN; the extra arguments' shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from quotient_sgd import observables as qobs
from quotient_sgd.optim import SGDSpec, eigenvectors_of, observables_of, quotient_trajectory, train

from helpers import charge_identity_error, first_step_observables, horizontal_basis
from test_optim_trajectory import CHEAP, data, init_mlp, mlp_group, mse, xent


# ----- the exact charge identity on further SGD chains ----------------------------------------------------------
def _lr(count):  # a decaying learning rate, float64 (optax's own schedules mix int32 and Python floats)
    return 0.1 * 0.97 ** count.astype(jnp.float64)


def _wd(count):  # a growing weight decay
    return 0.01 + 0.002 * count.astype(jnp.float64)


def _mom(count):  # a momentum warm-up 0.5 -> 0.9
    return 0.5 + 0.4 * (1 - 0.9 ** count.astype(jnp.float64))


_LAYERS = {"l0": True, "l1": False, "l2": True}
CHAINS = {
    # a global-norm clip before the decays: the clipped gradient stays horizontal, the decay is the one applied
    "clip_coupled_decay_momentum": lambda: (
        optax.chain(optax.clip_by_global_norm(0.05), optax.add_decayed_weights(0.01), optax.sgd(0.05, momentum=0.9)),
        SGDSpec(0.05, coupled_weight_decay=0.01, momentum=0.9)),
    "clip_decoupled_decay_nesterov": lambda: (
        optax.chain(optax.clip_by_global_norm(0.05), optax.trace(0.9, nesterov=True), optax.add_decayed_weights(0.01),
                    optax.scale(-0.05)),
        SGDSpec(0.05, weight_decay=0.01, momentum=0.9, nesterov=True)),
    # a weight-decay schedule inside optax.add_decayed_weights, the same function in the spec
    "decay_schedule_heavy_ball": lambda: (
        optax.chain(optax.trace(0.9), optax.add_decayed_weights(_wd), optax.scale(-0.05)),
        SGDSpec(0.05, weight_decay=_wd, momentum=0.9)),
    # injected schedules of the learning rate and the momentum itself (beta_k changes every step)
    "injected_momentum_schedule_nesterov": lambda: (
        optax.inject_hyperparams(optax.sgd)(learning_rate=_lr, momentum=_mom, nesterov=True),
        SGDSpec("learning_rate", momentum="momentum", nesterov=True)),
    # gradient accumulation: two of every three updates are zeros; the momentum sees the mean of three gradients
    "accumulated_coupled_decay_nesterov": lambda: (
        optax.MultiSteps(optax.chain(optax.add_decayed_weights(0.02), optax.sgd(0.05, momentum=0.9, nesterov=True)),
                         3, accumulator_dtype=jnp.float64),
        SGDSpec(0.05, coupled_weight_decay=0.02, momentum=0.9, nesterov=True)),
    # both decays, masked to the first and last layers (a unit's incoming side decayed, its outgoing side not)
    "masked_coupled_and_decoupled_decay": lambda: (
        optax.chain(optax.add_decayed_weights(0.03, mask=_LAYERS), optax.trace(0.9),
                    optax.add_decayed_weights(0.02, mask=_LAYERS), optax.scale(-0.05)),
        SGDSpec(0.05, weight_decay=0.02, coupled_weight_decay=0.03, momentum=0.9, decay_mask=_LAYERS)),
}


@pytest.mark.parametrize("name", list(CHAINS))
def test_charge_identity_on_further_sgd_chains(x64, name):
    """charge_drift == charge_drift_predicted to 1e-8 relative at every step (float64) for chains the main tests do
    not run: a global-norm clip before coupled / decoupled decay, a weight-decay schedule, an injected momentum
    schedule with Nesterov, MultiSteps accumulation, and masked coupled plus decoupled decay."""
    inner, spec = CHAINS[name]()
    tx = quotient_trajectory(inner, mlp_group(), spec=spec, observables=CHEAP)
    params = init_mlp(jax.random.key(0), dtype=jnp.float64)
    with jax.numpy_dtype_promotion("standard"):  # optax's MultiSteps / inject_hyperparams are not strict-clean
        _, _, traj = train(xent, params, tx, data(24, dtype=jnp.float64), donate=False)
    drift, pred = traj["charge_drift"], traj["charge_drift_predicted"]
    err = charge_identity_error(drift, pred)  # (a conserved component: both ~ rounding)
    assert err < 1e-8, (name, err)
    assert float(np.max(np.abs(np.asarray(drift["r0"])))) > 1e-4  # the charges do move


# ----- Lanczos extremes at every evaluation step --------------------------------------------------------------
def test_lanczos_top_and_bottom_k_at_every_evaluation_step(x64):
    """hessian_every=3 over 7 steps (not a multiple of 3; the last step is an evaluation), top-3 and bottom-3 of
    P H P at the current and at the canonical point: at steps 0, 3 and 6 they equal the dense eigenvalues of the
    Hessian at the parameters of that step (from a hand-written loop), in between they hold the last values, and the
    Ritz vectors kept are the last evaluation's eigenvectors."""
    group = mlp_group(permutation=True)
    params = init_mlp(jax.random.key(4), sizes=(3, 4, 3, 3), dtype=jnp.float64)
    n = sum(x.size for x in jax.tree.leaves(params))
    x = jax.random.normal(jax.random.key(1), (7, 16, 3), jnp.float64)
    y = jax.random.randint(jax.random.key(2), (7, 16), 0, 3)
    inner = optax.sgd(0.1, momentum=0.5)
    tx = quotient_trajectory(inner, group, observables=("loss",), hessian_every=3, hessian_k=3, lanczos_steps=n,
                             keep_eigenvectors=True, hessian_at=("horizontal", "quotient"))
    _, state, traj = train(xent, params, tx, (x, y), donate=False)
    np.testing.assert_array_equal(traj["hessian_step"], [0, 0, 0, 3, 3, 3, 6])

    @jax.jit
    def hessians(p, batch):  # the dense Hessians at the current and the canonical point, and the orbit tangents
        out = {}
        for where, point in (("horizontal", p), ("quotient", group.canonicalize(p))):
            out[where] = (qobs.dense_hessian(lambda q: xent(q, batch), point),
                          jax.vmap(lambda t: ravel_pytree(t)[0])(group.tangents(point)))
        return out

    def dense(p, batch):
        out = {}
        for where, (h, tangents) in hessians(p, batch).items():
            h, hor = np.asarray(h), horizontal_basis(tangents)[0]
            out[where] = (np.linalg.eigvalsh(hor.T @ h @ hor), hor.T @ h @ hor, hor)
        return out

    p, s = params, inner.init(params)
    step = jax.jit(lambda p, s, b: (lambda g: inner.update(g, s, p))(jax.grad(xent)(p, b)))
    apply = jax.jit(optax.apply_updates)  # (op by op, each leaf's add compiled)
    for k in range(7):
        batch = (x[k], y[k])
        for where in ("horizontal", "quotient"):
            top, bottom = traj[f"hessian_top_{where}"], traj[f"hessian_bottom_{where}"]
            if k % 3:
                np.testing.assert_array_equal(top[k], top[k - k % 3])
                np.testing.assert_array_equal(bottom[k], bottom[k - k % 3])
        if k % 3 == 0:
            ref = dense(p, batch)
            for where, (ev, _, _) in ref.items():
                scale = float(np.max(np.abs(ev)))
                np.testing.assert_allclose(traj[f"hessian_top_{where}"][k], ev[::-1][:3], atol=1e-6 * scale,
                                           err_msg=f"{where} step {k}")
                np.testing.assert_allclose(traj[f"hessian_bottom_{where}"][k], ev[:3], atol=1e-6 * scale,
                                           err_msg=f"{where} step {k}")
        u, s = step(p, s, batch)
        p = apply(p, u)
    # the kept vectors are eigenvectors of the last evaluation (step 6) with the recorded eigenvalues
    vecs = eigenvectors_of(state)
    for where in ("horizontal", "quotient"):
        _, h, hor = ref[where]
        for end in ("top", "bottom"):
            # (3, n), in ravel_pytree's order, in numpy (eager jnp compiled each op)
            v = np.concatenate([np.asarray(a).reshape(3, -1) for a in jax.tree.leaves(vecs[f"{end}_{where}"])], 1)
            w = v @ hor  # coordinates in the horizontal basis (the vectors are horizontal: unit norm kept)
            np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-6)
            lam = np.asarray(traj[f"hessian_{end}_{where}"][6])
            np.testing.assert_allclose(w @ h, lam[:, None] * w, atol=1e-6 * float(np.max(np.abs(lam))))


# ----- honest kinds on a normalised CNN ----------------------------------------------------------------------
def test_kinds_honest_on_a_layernorm_cnn(x64):
    """A LayerNorm CNN (scale blocks, rescale of the norm's output, channel permutations, logit translation), one
    step of SGD with momentum and coupled weight decay: every orbit-invariant per-step observable is unchanged on
    g.params for random g while grad_norm changes >= 2x for some g; every reduced-dynamics one is unchanged (up to
    the order of units) under charge-preserving elements (scale 0: the permutations alone)."""
    from flax import nnx

    from quotient_sgd.models import CNN

    model = CNN(1, (3, 4), 3, norm="layer", classifier=True, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    group = model.symmetries()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (6, 5, 5, 1), jnp.float64)
    y = jax.random.randint(jax.random.key(2), (6,), 0, 3)

    def loss(p):
        logp = nnx.merge(graphdef, p, rest)(x)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

    tx = quotient_trajectory(optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.05, momentum=0.9)), group,
                             spec=SGDSpec(0.05, coupled_weight_decay=0.01, momentum=0.9))

    observed = first_step_observables(tx, loss)

    o0 = observed(params)
    invariant = [k for k in o0 if qobs.kind_of(k) == qobs.ORBIT_INVARIANT]
    reduced = [k for k in o0 if qobs.kind_of(k) == qobs.REDUCED_DYNAMICS]
    assert set(invariant) == {"loss", "grad_norm_canonical", "invariant_norms"}
    assert {"effective_lr", "angular_update", "charges", "update_vertical_norm"} <= set(reduced)
    ratio = 1.0
    for i in range(2):
        o1 = observed(group.act(group.sample(jax.random.key(10 + i), params, scale=1.0), params))
        for k in invariant:
            for a, b in zip(jax.tree.leaves(o0[k]), jax.tree.leaves(o1[k])):
                np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-10, err_msg=k)
        ratio = max(ratio, float(o1["grad_norm"] / o0["grad_norm"]), float(o0["grad_norm"] / o1["grad_norm"]))
    assert ratio >= 2, ratio
    o1 = observed(group.act(group.sample(jax.random.key(30), params, scale=0.0), params))
    for k in reduced:
        for a, b in zip(jax.tree.leaves(o0[k]), jax.tree.leaves(o1[k])):
            np.testing.assert_allclose(np.sort(np.ravel(b)), np.sort(np.ravel(a)), rtol=1e-6, atol=1e-12,
                                       err_msg=k)


# ----- effective learning rate of a rescale chain ------------------------------------------------------------
def test_effective_lr_of_a_rescale_chain_is_eta_times_a2_plus_b2(x64):
    """Two hidden layers (the middle kernel is outgoing for one rescale and incoming for the next): each unit's
    effective_lr is eta (a^2 + b^2) exactly, at the parameters and at g.params; there a b moves (it is not an orbit
    invariant of the chain), so group.invariants, constant on the orbit, is not a b."""
    group = mlp_group(n_layers=3, translation=False)
    params = init_mlp(jax.random.key(0), sizes=(3, 5, 4, 2), dtype=jnp.float64)
    batch = (jax.random.normal(jax.random.key(5), (16, 3), jnp.float64), jnp.ones((16, 2), jnp.float64))
    eta = 0.05
    tx = quotient_trajectory(optax.sgd(eta), group, observables=("effective_lr",))

    @jax.jit
    def one(p):
        _, s = tx.update(jax.grad(mse)(p, batch), tx.init(p), p)
        return observables_of(s)["effective_lr"], group.invariants(p)

    def sq(p, layer, axis):  # in numpy (eager jnp compiled each op)
        k = np.sum(np.square(np.asarray(p[layer]["kernel"])), axis=axis)
        return k + np.square(np.asarray(p[layer]["bias"])) if axis == 0 else k

    ab = []
    for i in range(2):
        p = params if i == 0 else group.act(group.sample(jax.random.key(3), params, scale=1.0), params)
        eff, inv = one(p)
        for r, layer in ((0, 0), (1, 1)):
            a2, b2 = sq(p, f"l{layer}", 0), sq(p, f"l{layer + 1}", 1)
            np.testing.assert_allclose(eff[f"r{r}"], eta * (a2 + b2), rtol=1e-10)
        ab.append((np.sqrt(sq(p, "l0", 0) * sq(p, "l1", 1)), np.asarray(inv["r0"])))
    np.testing.assert_allclose(ab[1][1], ab[0][1], rtol=1e-8)  # the orbit invariant
    assert float(np.max(np.abs(ab[1][0] / ab[0][0] - 1))) > 0.5  # a b is not
    assert float(np.max(np.abs(ab[0][0] / ab[0][1] - 1))) > 0.1


# ----- the extra arguments and the Hessian arguments ---------------------------------------------------------
@pytest.mark.parametrize("value", [jnp.ones(3), (1.0, 2.0)], ids=["per_example", "loss_aux_pair"])
def test_value_must_be_the_scalar_loss(value):
    """A vector or a (loss, aux) pair as the extra argument value was recorded as the 'loss' observable with its
    shape ((3,), (2,)): the state's structure changed after the first update (inside lax.scan a carry-type error
    far from the cause; in a Python loop a wrong loss).  Now a ValueError naming value=."""
    params = init_mlp(jax.random.key(0))
    x, y = data(1)
    tx = quotient_trajectory(optax.sgd(0.1), mlp_group(), observables=("loss", "grad_norm"))
    # the gradient inside the compiled step (eager, each op of the backward pass was compiled on its own)
    step = jax.jit(lambda v: observables_of(tx.update(jax.grad(xent)(params, (x[0], y[0])), tx.init(params), params,
                                                      value=v)[1])["loss"])
    with pytest.raises(ValueError, match=r"extra argument value= must be the scalar loss"):
        step(value)
    assert float(step(3)) == 3.0  # a scalar of any type is recorded in the parameters' dtype


@pytest.mark.parametrize("loss_fn, error, match", [
    (lambda p, b: (xent(p, b), 1.0), ValueError, r"loss_fn must return the scalar loss.*got a tuple"),
    (lambda p, b: jnp.ones(3) * xent(p, b), ValueError, r"loss_fn must return the scalar loss.*got shape \(3,\)"),
    (None, TypeError, r"loss_fn must be a function params -> scalar loss"),
], ids=["loss_aux_pair", "vector", "not_callable"])
def test_hessian_loss_fn_must_return_a_scalar(loss_fn, error, match):
    """The extra argument loss_fn of hessian_every: a (loss, aux) pair or a vector failed inside the Hessian-vector
    product with JAX's "Gradient only defined for scalar-output functions", a number with "Expected a callable";
    now errors naming loss_fn."""
    params = init_mlp(jax.random.key(0))
    x, y = data(1)
    batch = (x[0], y[0])
    tx = quotient_trajectory(optax.sgd(0.1), mlp_group(), observables=("loss",), hessian_every=1, lanczos_steps=4)
    fn = 3.0 if loss_fn is None else (lambda p: loss_fn(p, batch))
    with pytest.raises(error, match=match):  # raised while tracing: nothing is compiled
        jax.jit(lambda p: tx.update(jax.grad(xent)(p, batch), tx.init(p), p, value=1.0, loss_fn=fn))(params)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(hessian_k=0), ValueError, r"hessian_k must be an integer >= 1, got 0"),
    (dict(lanczos_steps=2.5), ValueError, r"lanczos_steps must be an integer >= 1, got 2.5"),
    (dict(keep_eigenvectors="no"), TypeError, r"keep_eigenvectors must be True or False, got 'no'"),
    (dict(hessian_every=4, keep_eigenvectors="no"), TypeError, r"keep_eigenvectors must be True or False"),
    (dict(hessian_every=4, hessian_at=None), ValueError, r"hessian_at must be a sequence of names"),
    (dict(hessian_every=4, hessian_at=[["raw"]]), ValueError, r"hessian_at must be a sequence of names"),
])
def test_hessian_arguments_name_themselves(kwargs, error, match):
    """hessian_k / lanczos_steps were checked only with hessian_every set (an invalid value passed silently until it
    was added), keep_eigenvectors not at all (the string "no" kept the vectors: it is truthy), and a hessian_at of
    None or of lists failed in set() with a bare "not iterable" / "unhashable type"."""
    with pytest.raises(error, match=match):
        quotient_trajectory(optax.sgd(0.1), mlp_group(), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss_fn=3.0), r"train: loss_fn must be a function \(params, batch\) -> loss"),
    (dict(tx=optax.sgd), r"train: tx must be an optax.GradientTransformation"),
    (dict(donate="no"), r"train: donate must be True or False, got 'no'"),
    (dict(has_aux="no"), r"train: has_aux must be True or False, got 'no'"),
    (dict(example_loss_fn=3.0), r"train: example_loss_fn must be None or a function, got 3.0"),
    (dict(act_on_model_state=3), r"train: act_on_model_state must be None or a function, got 3"),
])
def test_train_arguments_of_the_wrong_kind_name_themselves(kwargs, match):
    """train read donate / has_aux by their truth value (donate="no" donated, i.e. deleted, the caller's parameters;
    has_aux="no" asked loss_fn for (loss, aux)), and a loss_fn / example_loss_fn that is not callable or a tx that is
    not a transformation failed inside the traced loop with a bare "'float' object is not callable" /
    AttributeError.  Now TypeErrors naming the argument, before anything runs; the parameters are kept."""
    params = init_mlp(jax.random.key(0))
    args = dict(loss_fn=xent, tx=optax.sgd(0.1))
    args.update({k: v for k, v in kwargs.items() if k in args})
    rest = {k: v for k, v in kwargs.items() if k not in args}
    with pytest.raises(TypeError, match=match):
        train(args["loss_fn"], params, args["tx"], data(2), **rest)
    assert not any(x.is_deleted() for x in jax.tree.leaves(params))


def test_a_noise_example_loss_fn_that_is_not_callable_is_named():
    params = init_mlp(jax.random.key(0))
    x, y = data(1)
    tx = quotient_trajectory(optax.sgd(0.1), mlp_group(), observables=("loss",), noise_every=1)
    with pytest.raises(TypeError, match=r"extra argument example_loss_fn must be a function params -> \(B,\)"):
        jax.jit(lambda p: tx.update(jax.grad(xent)(p, (x[0], y[0])), tx.init(p), p, example_loss_fn=3.0))(params)


@pytest.mark.parametrize("method", ["loop", "unrolled"])
def test_lanczos_past_the_dimension_gives_nan_not_padding(x64, method):
    """k above the dimension of the operator's domain: the extremes past it were copies of the first Lanczos
    coefficient (top-7 of diag(0..4): [4, 3, 2, 1, 0, 2, 2], not descending; bottom-k likewise), returned as
    eigenvalues.  Now NaN with zero vectors; the others are the eigenvalues, unchanged."""
    m = jnp.diag(jnp.arange(5.0, dtype=jnp.float64))
    ex = jax.jit(lambda v: qobs.lanczos_extremes(lambda u: m @ u, v, num_matvecs=8, k=7, method=method))(
        jnp.ones(5, jnp.float64))
    np.testing.assert_allclose(ex.top[:5], [4, 3, 2, 1, 0], atol=1e-10)
    np.testing.assert_allclose(ex.bottom[:5], [0, 1, 2, 3, 4], atol=1e-10)
    top, bottom, top_vectors = (np.asarray(a) for a in (ex.top, ex.bottom, ex.top_vectors))  # (numpy: no compiles)
    assert bool(np.all(np.isnan(top[5:]))) and bool(np.all(np.isnan(bottom[5:])))
    assert float(np.max(np.abs(top_vectors[5:]))) == 0.0
    np.testing.assert_allclose(np.abs(top_vectors[0]), [0, 0, 0, 0, 1], atol=1e-8)
