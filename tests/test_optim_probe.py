"""The public API of quotient_sgd.optim on inputs beyond the main tests: auxiliary outputs, argument checks."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from quotient_sgd.optim import flatten_trajectory, quotient_trajectory, train
from test_optim_trajectory import apply_mlp, data, init_mlp, mlp_group


def xent_with_aux(p, batch):
    x, y = batch
    logits = apply_mlp(p, x)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    return loss, (jnp.mean((jnp.argmax(logits, -1) == y).astype(logits.dtype)), logits)


def test_flatten_trajectory_flattens_a_tuple_aux_for_savez():
    """An aux returned as a tuple (accuracy, logits) became one entry holding the tuple, which numpy.savez
    could not store (arrays of different shapes); now every array has its own key."""
    aux = (jnp.linspace(0.0, 1.0, 3), jnp.ones((3, 8, 3)))  # (accuracy, logits) stacked over 3 steps
    traj = {"loss": jnp.zeros(3), "charges": {"r0": jnp.zeros((3, 5)), "t": {"bias": jnp.zeros(3)}}, "aux": aux}
    flat = flatten_trajectory(traj)
    assert list(flat) == ["loss", "charges/r0", "charges/t/bias", "aux/0", "aux/1"]
    buf = io.BytesIO()
    np.savez(buf, **flat)
    buf.seek(0)
    with np.load(buf) as z:
        np.testing.assert_array_equal(z["aux/1"], aux[1])
        assert z["aux/1"].shape == (3, 8, 3) and z["aux/0"].shape == (3,)
    # NamedTuple fields by name, None left out
    from collections import namedtuple

    pair = namedtuple("pair", "acc logits")
    out = flatten_trajectory({"b": {"y": 1, "x": None}, "aux": pair(2, [3, {"z": 4}])}, sep=".")
    assert out == {"b.y": 1, "aux.acc": 2, "aux.logits.0": 3, "aux.logits.1.z": 4}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hessian_every=2, hessian_k=1.5), r"hessian_k must be an integer >= 1, got 1.5"),
        (dict(hessian_every=2, hessian_k=True, lanczos_steps=4), r"hessian_k must be an integer >= 1, got True"),
        (dict(hessian_every=2, lanczos_steps=6.0), r"lanczos_steps must be an integer >= 1, got 6.0"),
        (dict(seed=1.5), r"seed must be an integer .*got 1.5"),
        (dict(seed=jax.random.key(0)), r"seed must be an integer"),
        (dict(observables=("loss", "sharpness_quotient")), r"'sharpness_quotient' is recorded with hessian_every=K"),
        (dict(observables=("temperature",)), r"'temperature' is recorded with noise_every=K"),
        (dict(observables=("grad_nrom",)), r"unknown observables \['grad_nrom'\](.|\n)*did you mean 'grad_norm'"),
        (dict(hessian_every=2, hessian_at=("raw", "raw")), r"hessian_at: names a point more than once"),
    ],
)
def test_more_bad_arguments_name_themselves(kwargs, match):
    """A float hessian_k / lanczos_steps failed inside the first traced step ('Shapes must be 1D sequences of
    concrete values of integer type'), True was taken as 1, a float or key seed failed inside jax.random.key;
    Hessian and noise keys put in observables= were only 'unknown'.  Now each error names the argument."""
    with pytest.raises((ValueError, TypeError), match=match):
        quotient_trajectory(optax.sgd(0.1), mlp_group(), **kwargs)


def _xent(p, batch):
    return xent_with_aux(p, batch)[0]


def _batch_fn(step, key):
    return jax.tree.map(lambda a: a[0], data(1))


def test_train_names_a_bad_key_unroll_or_opt_state():
    """An integer key failed inside the scan ('JAX encountered invalid PRNG key data'), a float unroll with
    "'float' object cannot be interpreted as an integer", and the inner optimiser's state passed as opt_state of
    the wrapped one with "'tuple' object has no attribute 'inner_state'"; each now names its argument."""
    params = init_mlp(jax.random.key(0))
    tx = quotient_trajectory(optax.sgd(0.1), mlp_group(), observables=("loss",))
    with pytest.raises(TypeError, match=r"train: key must be a PRNG key, e\.g\. jax\.random\.key\(0\).*got 0"):
        train(_xent, params, tx, _batch_fn, num_steps=2, key=0, donate=False)
    with pytest.raises(ValueError, match=r"train: unroll must be an integer >= 0 or a bool .*got 1.5"):
        train(_xent, params, tx, data(2), unroll=1.5, donate=False)
    with pytest.raises(ValueError, match=r"train: opt_state does not have the structure of tx\.init\(params\)"):
        train(_xent, params, tx, data(2), opt_state=optax.sgd(0.1).init(params), donate=False)
    # what was accepted stays accepted: a raw uint32 key, and the state tx.init gives
    traj = train(_xent, params, tx, _batch_fn, num_steps=2, key=jax.random.PRNGKey(1), opt_state=tx.init(params),
                 donate=False)[2]
    assert traj["loss"].shape == (2,)


def test_a_group_without_canonical_section_names_what_needs_one(x64):
    """A deep linear chain that is not minimal has no canonical representative.  Observables that do not need one
    run: curvature alone (its learning rate served only the shock / fold numbers, yet was computed at the
    canonical point) and the raw Hessian (whose learning rate only the horizontal one uses); before, both were a
    SymmetryError telling to 'use the invariants'.  What does need it is named in the error."""
    from quotient_sgd.optim import SGDSpec
    from quotient_sgd.symmetry import GL, Product, SymmetryError

    # models.DeepLinear(3, (4, 5), 2): W0 (3, 4), W1 (4, 5), W2 (5, 2) with GL(4) and GL(5) between them
    ks = jax.random.split(jax.random.key(0), 3)
    sizes = (3, 4, 5, 2)
    params = {f"w{i}": jax.random.normal(ks[i], (a, b), jnp.float64) / np.sqrt(a)
              for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}
    group = Product([GL(left=((f"w{i}",), None), right=((f"w{i + 1}",), None), kind="vo", name=f"gl{i}")
                     for i in range(2)])
    x = jax.random.normal(jax.random.key(1), (4, 8, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (4, 8, 2), jnp.float64)

    def mse(p, batch):
        return jnp.mean(jnp.square(batch[0] @ p["w0"] @ p["w1"] @ p["w2"] - batch[1]))

    sgd = optax.sgd(0.05)
    traj = train(mse, params, quotient_trajectory(sgd, group, observables=("curvature",), hessian_every=2,
                                                  hessian_at=("raw",), lanczos_steps=2), (x, y), donate=False)[2]
    ref = train(mse, params, quotient_trajectory(sgd, group, observables=("curvature",), spec=SGDSpec(0.05)), (x, y),
                donate=False)[2]
    np.testing.assert_allclose(traj["curvature"], ref["curvature"], rtol=1e-12)
    assert float(jnp.max(jnp.abs(traj["curvature"]))) > 0 and bool(jnp.all(jnp.isfinite(traj["sharpness_raw"])))
    with pytest.raises(SymmetryError, match=r"needed by: grad_norm_canonical; invariant_norms; effective_lr(.|\n)*"
                                            r"minimal chains only"):
        train(mse, params, quotient_trajectory(sgd, group), (x, y), donate=False)
    with pytest.raises(SymmetryError, match=r"needed by: hessian_at 'quotient'"):
        train(mse, params, quotient_trajectory(sgd, group, observables=("loss",), hessian_every=2, lanczos_steps=4,
                                               spec=SGDSpec(0.05)), (x, y), donate=False)


def _bf16_problem():
    group = mlp_group()
    params = init_mlp(jax.random.key(0), dtype=jnp.bfloat16)

    def loss(p, batch):
        x, y = batch
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply_mlp(p, x), y))

    return group, params, loss, data(6)


def test_low_precision_parameters_are_observed_in_float32():
    """bfloat16 parameters: the observables and the horizontal projection ran the group's eigh / CG in
    bfloat16, which XLA:CPU has no kernels for (NotImplementedError); they now run in float32 while the
    parameters and updates keep their dtype, and the charge identity holds to the parameters' rounding."""
    from quotient_sgd.optim import SGDSpec, horizontal

    group, params, loss, batches = _bf16_problem()
    tx = quotient_trajectory(optax.sgd(0.05, momentum=0.9, nesterov=True), group,
                             spec=SGDSpec(0.05, momentum=0.9, nesterov=True),
                             observables=("loss", "grad_norm", "grad_norm_canonical", "update_vertical_norm",
                                          "charges", "charge_drift", "charge_drift_predicted"))
    p, _, traj = train(loss, params, tx, batches, donate=False)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p))
    flat = flatten_trajectory(traj)
    assert flat["grad_norm"].dtype == jnp.float32 and np.isfinite(flat["update_vertical_norm"]).all()
    for k in [k for k in flat if k.startswith("charge_drift/")]:
        observed, predicted = flat[k][1:], flat["charge_drift_predicted" + k[len("charge_drift"):]][1:]
        scale = np.max(np.abs(flat["charges" + k[len("charge_drift"):]]))
        np.testing.assert_allclose(observed, predicted, atol=2e-2 * scale, err_msg=k)  # bfloat16: 8 bits
    # horizontal(): bfloat16 updates, horizontal to their rounding
    tx = quotient_trajectory(horizontal(optax.sgd(0.1), group), group,
                             observables=("update_horizontal_norm", "update_vertical_norm"))
    p, _, traj = train(loss, params, tx, batches, donate=False)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p))
    assert (np.asarray(traj["update_vertical_norm"]) <= 1e-2 * np.asarray(traj["update_horizontal_norm"])).all()


@pytest.mark.slow
def test_low_precision_parameters_hessian():
    """The horizontal Hessian of bfloat16 parameters is taken at their float32 values (a finite sharpness)."""
    group, params, loss, batches = _bf16_problem()
    tx = quotient_trajectory(optax.sgd(0.05), group, observables=("loss",), hessian_every=3, lanczos_steps=4,
                             hessian_at=("horizontal",))
    _, _, traj = train(loss, params, tx, batches, donate=False)
    s = np.asarray(traj["sharpness_horizontal"])
    assert s.dtype == np.float32 and np.isfinite(s[[0, 3]]).all()


def test_gauge_fix_canonicalises_low_precision_parameters_in_float32():
    """gauge_fix on a bfloat16 deep linear chain (a GL symmetry: SVD / QR) failed with NotImplementedError; it now
    canonicalises in float32, the parameters stay bfloat16 and, at zero learning rate, the function is unchanged to
    bfloat16 rounding while the parameters move to the balanced point."""
    from flax import nnx

    from quotient_sgd import models
    from quotient_sgd.optim import gauge_fix

    model = models.DeepLinear(3, (2,), 3, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    group = model.symmetries()
    g = group.sample(jax.random.key(1), params, 1.0)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), group.act(g, params))
    x = jax.random.normal(jax.random.key(2), (5, 3), jnp.bfloat16)

    def f(p):
        return nnx.merge(graphdef, p)(x).astype(jnp.float32)

    tx = gauge_fix(optax.sgd(0.0), group)
    u, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, u)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(new))
    np.testing.assert_allclose(f(new), f(params), rtol=5e-2, atol=5e-2 * float(jnp.max(jnp.abs(f(params)))))
    moved = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)))
    assert moved > 0.1
