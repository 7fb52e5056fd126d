"""Issue 3's "Must show" properties re-checked on cases the other tests do not use: the charge identity on a
Transformer's matrix (GL) charges with Nesterov and decoupled decay; honest kinds on a Transformer, with the
reduced-dynamics observables under orthogonal GL elements and head permutations; gauge_fix equivariance on a CNN
with Nesterov momentum; Lanczos against a dense eigendecomposition on a mean-field network; train vmapped over
8 (learning rate, weight decay) pairs against 8 runs, with the charge prediction read from injected values."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import charge_identity_error, horizontal_basis
from jax.flatten_util import ravel_pytree

from quotient_sgd import observables as qobs
from quotient_sgd.models import CNN, MeanField, Transformer
from quotient_sgd.optim import SGDSpec, gauge_fix, member_axes, quotient_trajectory, set_hyperparams, train

CHEAP = ("loss", "charges", "charge_drift", "charge_drift_predicted")


# ----- a small Transformer on next-token prediction -----------------------------------------------------------
def _transformer():
    model = Transformer(7, 8, 2, 1, 4, rngs=nnx.Rngs(5), mlp_ratio=2, param_dtype=jnp.float64)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return model.symmetries(), graphdef, params, rest


def _next_token_loss(graphdef, rest):
    def loss(p, tokens):
        logp = nnx.merge(graphdef, p, rest)(tokens)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.roll(tokens, -1, axis=1)[..., None], axis=-1))
    return loss


def test_charge_identity_nesterov_decoupled_decay_on_transformer_gl_charges(x64):
    """Nesterov momentum with decoupled weight decay on a Transformer: every charge (the per-head 4 x 4 QK / VO
    matrices, the MLP's per-unit rescale charges, the logit translation) drifts by exactly the predicted amount at
    each of 25 steps (1e-8 relative, float64)."""
    group, graphdef, params, rest = _transformer()
    loss = _next_token_loss(graphdef, rest)
    tokens = jax.random.randint(jax.random.key(1), (25, 4, 4), 0, 7)
    inner = optax.chain(optax.trace(0.9, nesterov=True), optax.add_decayed_weights(0.02), optax.scale(-0.05))
    spec = SGDSpec(0.05, weight_decay=0.02, momentum=0.9, nesterov=True)
    tx = quotient_trajectory(inner, group, spec=spec, observables=CHEAP)
    _, _, traj = train(loss, params, tx, tokens, donate=False)
    drift, pred = traj["charge_drift"], traj["charge_drift_predicted"]
    qk = [k for k in drift if k.startswith("qk/")][0]
    assert drift[qk].shape[1:] == (2, 4, 4)  # a matrix charge per head
    assert charge_identity_error(drift, pred) < 1e-8
    assert float(jnp.max(jnp.abs(drift[qk]))) > 1e-5  # the decay and momentum really move the GL charges


def _spectrum(x):
    """Sorted values of a per-unit array, or the eigenvalues of (a stack of) symmetric matrix charges (an
    orthogonal GL element conjugates them)."""
    x = np.asarray(x)
    if x.ndim >= 3 and x.shape[-1] == x.shape[-2]:
        x = np.linalg.eigvalsh(x.reshape((x.shape[0], -1) + x.shape[-2:]))
    return np.sort(x.reshape(x.shape[0], -1), axis=1)


# (test_optim_trajectory.py::test_kinds_honest, an MLP, and test_optim_probe6.py, a LayerNorm CNN, check it fast)
@pytest.mark.slow
def test_kinds_honest_on_transformer_under_orthogonal_gl_and_head_permutations(x64):
    """Orbit invariants of the first step are unchanged on g.params for a random g of scale 1.5 (GL condition number
    e^4.5) while the raw gradient norm changes >= 2x; every reduced-dynamics observable of two SGD steps with
    momentum and coupled decay is unchanged (up to the order of units and the conjugation of GL charges) under
    orthogonal QK / VO elements and the head permutation, the charge-preserving elements of the Transformer."""
    group, graphdef, params, rest = _transformer()
    loss = _next_token_loss(graphdef, rest)
    tokens = jax.random.randint(jax.random.key(1), (2, 5, 4), 0, 7)
    inner = optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.05, momentum=0.9))
    tx = quotient_trajectory(inner, group, spec=SGDSpec(0.05, coupled_weight_decay=0.01, momentum=0.9))
    run = jax.jit(lambda p: train(loss, p, tx, tokens, donate=False)[2])
    t0 = run(params)
    invariant = [k for k in t0 if qobs.kind_of(k) == qobs.ORBIT_INVARIANT]
    reduced = [k for k in t0 if qobs.kind_of(k) == qobs.REDUCED_DYNAMICS]
    assert {"loss", "grad_norm_canonical", "invariant_norms"} <= set(invariant)
    assert {"effective_lr", "charges", "curvature", "update_vertical_norm"} <= set(reduced)
    t1 = run(group.act(group.sample(jax.random.key(100), params, scale=1.5), params))
    for k in invariant:  # (the second step starts from another orbit point: only the first is comparable)
        for a, b in zip(jax.tree.leaves(t0[k]), jax.tree.leaves(t1[k])):
            np.testing.assert_allclose(b[0], a[0], rtol=1e-6, err_msg=k)
    ratio = float(t1["grad_norm"][0] / t0["grad_norm"][0])
    assert max(ratio, 1 / ratio) >= 2, ratio
    names = [c.name for c in group.components if c.name.split("/")[0] in ("qk", "vo")]
    names += [c.name for c in group.components if c.name.endswith(".heads")]
    assert len(names) == 3, names
    for name in names:
        for j in range(8):  # orthogonal GL elements; the first draw that is not the identity for the permutation
            g = group.sample_component(jax.random.key(7 + j), params, name, scale=0.0)
            moved = group.act(g, params)
            if float(jnp.max(jnp.abs(ravel_pytree(moved)[0] - ravel_pytree(params)[0]))) > 1e-2:
                break
        else:
            raise AssertionError(f"{name}: 8 draws of the identity")
        t1 = run(moved)
        for k in reduced:
            for a, b in zip(jax.tree.leaves(t0[k]), jax.tree.leaves(t1[k])):
                sa, sb = _spectrum(a), _spectrum(b)
                np.testing.assert_allclose(sb, sa, rtol=1e-8, atol=1e-12 + 1e-8 * float(np.max(np.abs(sa))),
                                           err_msg=f"{name}: {k}")


@pytest.mark.slow  # (test_optim_gauge.py::test_gauge_fix_equivariance checks the property fast)
def test_gauge_fix_equivariance_on_cnn_with_nesterov(x64):
    """SGD with Nesterov momentum + gauge_fix on a ReLU CNN (channel rescale, channel permutation, logit
    translation) from params and from g.params computes the same function at every step (float64, 1e-9); without
    gauge_fix the two runs differ from the second step on."""
    model = CNN(1, (3, 4), 3, classifier=True, rngs=nnx.Rngs(2), param_dtype=jnp.float64)
    group = model.symmetries()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    xs = jax.random.normal(jax.random.key(1), (6, 6, 8, 8, 1), jnp.float64)
    ys = jax.random.randint(jax.random.key(2), (6, 6), 0, 3)
    probe = jax.random.normal(jax.random.key(3), (5, 8, 8, 1), jnp.float64)

    def loss(p, batch):
        m = nnx.merge(graphdef, p, rest)
        x, y = batch
        return -jnp.mean(jnp.take_along_axis(m(x), y[:, None], axis=1)), m(probe)

    moved = group.act(group.sample(jax.random.key(11), params, scale=1.0), params)
    inner = optax.sgd(0.1, momentum=0.9, nesterov=True)
    for name, tx in (("fixed", gauge_fix(inner, group)), ("plain", inner)):
        run = jax.jit(lambda p, tx=tx: train(loss, p, tx, (xs, ys), has_aux=True, donate=False)[2]["aux"])
        a, b = np.asarray(run(params)), np.asarray(run(moved))
        err = np.max(np.abs(a - b), axis=(1, 2))
        if name == "fixed":
            assert float(np.max(err)) < 1e-9 * float(np.max(np.abs(a))), err
        else:
            assert float(np.min(err[1:])) > 1e-2, err


@pytest.mark.slow  # (test_observables_hessian.py::test_projected_hessian_lanczos_vs_dense checks the property fast)
def test_lanczos_extremes_match_dense_on_meanfield(x64):
    """Top-2 / bottom-2 eigenvalues of P H P on a MeanField network's horizontal space (30 parameters, 6 rescale
    generators), at an unbalanced point and at its canonical representative, from Lanczos equal the dense
    eigendecomposition (1e-6 relative); the top Ritz vector is horizontal."""
    model = MeanField(2, 6, 2, rngs=nnx.Rngs(1), param_dtype=jnp.float64)
    group = model.symmetries()
    graphdef, p0, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (32, 2), jnp.float64)
    y = jnp.stack([jnp.sin(x[:, 0]), x[:, 0] * x[:, 1]], 1)
    loss = lambda p: jnp.mean((nnx.merge(graphdef, p, rest)(x) - y) ** 2)  # noqa: E731
    params = group.act(group.sample(jax.random.key(3), p0, scale=0.7), p0)

    @jax.jit
    def everything(p):
        out = {}
        for where, point, fn in (("horizontal", p, qobs.sharpness_horizontal),
                                 ("quotient", group.canonicalize(p), qobs.sharpness_quotient)):
            tang = jax.vmap(lambda t: ravel_pytree(t)[0])(group.tangents(point))
            ex = fn(loss, group, p, key=jax.random.key(7), num_matvecs=24, k=2)
            out[where] = (qobs.dense_hessian(loss, point), tang, ex)
        return out

    res = everything(params)
    tops = []
    for where in ("horizontal", "quotient"):
        h, tang, ex = res[where]
        hor, rank = horizontal_basis(tang)
        assert rank == 6
        ev = np.linalg.eigvalsh(hor.T @ np.asarray(h) @ hor)
        scale = float(np.max(np.abs(ev)))
        np.testing.assert_allclose(ex.top, ev[::-1][:2], rtol=1e-6, atol=1e-8 * scale, err_msg=where)
        np.testing.assert_allclose(ex.bottom, ev[:2], rtol=1e-6, atol=1e-8 * scale, err_msg=where)
        v = ravel_pytree(jax.tree.map(lambda t: t[0], ex.top_vectors))[0]
        assert float(jnp.linalg.norm(tang @ v)) < 1e-8 * float(jnp.linalg.norm(tang))
        tops.append(float(ex.top[0]))
    assert abs(tops[0] / tops[1] - 1) > 0.1  # the unbalanced point sees another sharpness than the canonical one


@pytest.mark.slow  # (test_optim_train.py::test_vmap_over_learning_rates_equals_separate_runs checks the property fast)
def test_train_vmapped_over_8_learning_rates_and_decays_equals_8_runs_on_meanfield(x64):
    """A MeanField network, Nesterov SGD with coupled weight decay, both injected and swept jointly over 8 members
    in one vmapped train (observables every 2 steps: a branch under vmap): parameters and every trajectory entry equal
    the 8 separate runs (1e-10), and the charge drift equals the prediction read from each member's injected
    values."""
    model = MeanField(3, 12, 2, rngs=nnx.Rngs(4), param_dtype=jnp.float64)
    group = model.symmetries()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    xs = jax.random.normal(jax.random.key(1), (64, 3), jnp.float64)
    ys = jnp.stack([jnp.sin(xs[:, 0]), xs[:, 1] * xs[:, 2]], axis=1)

    def batch_fn(step, key):
        idx = jax.random.choice(key, 64, (16,), replace=False)
        return xs[idx], ys[idx]

    def loss(p, batch):
        return jnp.mean((nnx.merge(graphdef, p, rest)(batch[0]) - batch[1]) ** 2)

    inner = optax.chain(optax.inject_hyperparams(optax.add_decayed_weights)(weight_decay=0.01),
                        optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9, nesterov=True))
    spec = SGDSpec("learning_rate", coupled_weight_decay="weight_decay", momentum="momentum", nesterov=True)
    tx = quotient_trajectory(inner, group, spec=spec, every=2)
    s0 = tx.init(params)
    axes = member_axes(s0)
    lrs, wds = jnp.linspace(0.02, 0.3, 8), jnp.linspace(0.0, 0.05, 8)
    states = jax.vmap(lambda lr, wd: set_hyperparams(s0, learning_rate=lr, weight_decay=wd), out_axes=axes)(lrs, wds)
    run = lambda s: train(loss, params, tx, batch_fn, num_steps=10, opt_state=s, donate=False,  # noqa: E731
                          key=jax.random.key(9))
    pv, _, tv = jax.jit(jax.vmap(run, in_axes=(axes,)))(states)
    one = jax.jit(run)
    for i in range(8):
        si = jax.tree.map(lambda a, ax: a if ax is None else a[i], states, axes, is_leaf=lambda x: x is None)
        pi, _, ti = one(si)
        for a, b in zip(jax.tree.leaves((pv, tv)), jax.tree.leaves((pi, ti))):
            np.testing.assert_allclose(a[i], b, rtol=1e-10, atol=1e-14)
    assert charge_identity_error(tv["charge_drift"], tv["charge_drift_predicted"]) < 1e-8
    assert len({float(v) for v in tv["loss"][:, -1]}) == 8


# ----- a spec for Muon or SAM is refused --------------------------------------------------------------------
def test_an_sgd_spec_for_muon_or_sam_is_refused():
    """optax.contrib's Muon (an orthogonalised step) and SAM (gradients taken at an adversarial point) do not take
    the SGD step an SGDSpec describes (measured: the predicted drift ~100% off for scale_by_muon, 240% for sam),
    and their states show it: init refuses the spec, naming the state; without a spec they run, and
    horizontal(...) around them is still accepted with one."""
    import optax.contrib

    params = {"l0": {"kernel": jnp.ones((3, 6))}, "l1": {"kernel": jnp.ones((6, 2))}}
    from quotient_sgd.optim import horizontal
    from quotient_sgd.symmetry import Product, Rescale

    group = Product((Rescale(incoming=((("l0", "kernel"), 1),), outgoing=((("l1", "kernel"), 0),), name="r0"),))
    dims = jax.tree.map(lambda _: optax.contrib.MuonDimensionNumbers(), params)
    cases = {
        "MuonState": optax.chain(optax.contrib.scale_by_muon(beta=0.9, weight_dimension_numbers=dims),
                                 optax.scale(-0.05)),
        "SAMState": optax.contrib.sam(optax.sgd(0.1), optax.sgd(0.05), sync_period=2),
    }
    for state, inner in cases.items():
        tx = quotient_trajectory(inner, group, spec=SGDSpec(0.05, momentum=0.9), observables=CHEAP)
        with pytest.raises(ValueError, match=rf"SGDSpec.*holds \['{state}'\].*spec=None"):
            tx.init(params)
        quotient_trajectory(inner, group, observables=CHEAP).init(params)
        quotient_trajectory(horizontal(inner, group), group, spec=SGDSpec(0.05), observables=CHEAP).init(params)


# ----- the charge identity through diagnostics.shock_aware_lr ------------------------------------------------
def _two_layer():
    """A bias-free ReLU net 3-6-2 with one rescale per hidden unit, float64, and 30 regression batches."""
    from quotient_sgd.symmetry import Product, Rescale

    k = jax.random.split(jax.random.key(0), 2)
    params = {"l0": {"kernel": jax.random.normal(k[0], (3, 6), jnp.float64) / 2},
              "l1": {"kernel": jax.random.normal(k[1], (6, 2), jnp.float64) / 2}}
    group = Product((Rescale(incoming=((("l0", "kernel"), 1),), outgoing=((("l1", "kernel"), 0),), name="r0"),))
    x = jax.random.normal(jax.random.key(1), (30, 8, 3), jnp.float64)
    return params, group, (x, jnp.sin(x[..., :2]))


def _two_layer_loss(p, batch):
    x, y = batch
    return jnp.mean((jax.nn.relu(x @ p["l0"]["kernel"]) @ p["l1"]["kernel"] - y) ** 2)


@pytest.mark.parametrize("policy", ["cap", "track"])
def test_charge_identity_through_shock_aware_lr(x64, policy):
    """shock_aware_lr(sgd) scales the whole update by its s_k: the step is SGD's with learning rate eta s_k, and
    the prediction from SGDSpec(eta, ...) of the wrapped optimiser equals the observed drift at every step (1e-8;
    it took the spec's eta as it is and was 47-76% off here), with heavy-ball momentum and decoupled decay, and
    with Nesterov momentum and coupled decay.  A shock_aware_lr on only some parameters is refused with a spec."""
    from quotient_sgd.diagnostics import shock_aware_lr

    params, group, data = _two_layer()
    chains = {
        "heavy_ball_decoupled": (optax.chain(optax.trace(0.9), optax.add_decayed_weights(0.01), optax.scale(-0.5)),
                                 SGDSpec(0.5, weight_decay=0.01, momentum=0.9)),
        "nesterov_coupled": (optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.5, momentum=0.9, nesterov=True)),
                             SGDSpec(0.5, coupled_weight_decay=0.01, momentum=0.9, nesterov=True)),
    }
    for name, (inner, spec) in chains.items():
        wrapped = shock_aware_lr(inner, fold_target=0.5, policy=policy, max_scale=2.0 if policy == "track" else 1.0)
        tx = quotient_trajectory(wrapped, group, spec=spec, observables=CHEAP)
        _, state, traj = train(_two_layer_loss, params, tx, data, donate=False)
        assert abs(float(state.inner_state.scale) - 1) > 0.1, name  # the control really rescaled the steps
        assert charge_identity_error(traj["charge_drift"], traj["charge_drift_predicted"]) < 1e-8, name
    part = optax.chain(optax.masked(shock_aware_lr(optax.sgd(0.1)), {"l0": True, "l1": False}),
                       optax.masked(optax.sgd(0.1), {"l0": False, "l1": True}))
    with pytest.raises(ValueError, match=r"shock_aware_lr that scales the updates of only some parameters"):
        quotient_trajectory(part, group, spec=SGDSpec(0.1), observables=CHEAP).init(params)


# ----- set_hyperparams: values of the wrong kind are named, not cast --------------------------------------------
def test_set_hyperparams_refuses_a_bool_a_complex_or_a_string():
    """learning_rate=True was stored as 1.0 and 1+2j as 1.0 (the imaginary part dropped), silently; '0.2' failed in
    JAX's conversion without naming the hyperparameter.  Each is an error naming it; real values, arrays and a
    vmapped vector still set it."""
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
    state = tx.init({"w": jnp.ones(3)})
    for bad in (True, jnp.array(True), 1 + 2j):
        with pytest.raises(ValueError, match=r"set_hyperparams: learning_rate is stored as float32, got .* dtype"):
            set_hyperparams(state, learning_rate=bad)
    with pytest.raises(TypeError, match=r"set_hyperparams: learning_rate='0.2' is not allowed; need a real number"):
        set_hyperparams(state, learning_rate="0.2")
    assert float(set_hyperparams(state, learning_rate=1).hyperparams["learning_rate"]) == 1.0
    lrs = jax.vmap(lambda v: set_hyperparams(state, learning_rate=v).hyperparams["learning_rate"])(
        jnp.array([0.25, 0.5]))
    np.testing.assert_array_equal(lrs, [0.25, 0.5])


def test_quotient_trajectory_names_a_seed_out_of_range():
    """seed=2**63 raised jax.random.key's bare OverflowError ("Python int too large to convert to C long")."""
    from quotient_sgd.symmetry import Product

    with pytest.raises(ValueError, match=r"seed=9223372036854775808 is not allowed; need an integer in \[-2\*\*63"):
        quotient_trajectory(optax.sgd(0.1), Product(()), seed=2**63)
    quotient_trajectory(optax.sgd(0.1), Product(()), seed=2**63 - 1)


def test_sgd_spec_holds_a_concrete_array_to_the_rules_of_a_number():
    """SGDSpec(-0.1) was refused but SGDSpec(jnp.array(-0.1)) accepted, and so were NaN, infinite, complex, string
    and bool arrays; each is refused naming the field, a valid 0-d array (and a traced value) still passes."""
    for bad in (jnp.array(-0.1), np.array(np.nan), jnp.array(jnp.inf), jnp.array(1 + 1j), np.array("a"),
                jnp.array(True)):
        with pytest.raises(ValueError, match=r"SGDSpec: momentum=.* is not allowed; need a finite number >= 0"):
            SGDSpec(0.1, momentum=bad)
    assert float(SGDSpec(jnp.array(0.1), momentum=np.array(0.9)).momentum) == pytest.approx(0.9)
    assert float(jax.jit(lambda lr: SGDSpec(lr).learning_rate)(0.25)) == 0.25
