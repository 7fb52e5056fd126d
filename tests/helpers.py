"""Tree tolerance helpers and run-directory readers for tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np


def child_xla_flags() -> str:
    """The XLA compilation options this process compiles with (tests/conftest.py: optimisation level, fusion
    emitters, code generation split), for a subprocess whose results are compared bitwise with this process's: the
    same program compiled with other options rounds differently."""
    names = ("xla_backend_optimization_level", "xla_cpu_use_fusion_emitters", "xla_cpu_parallel_codegen_split_count")
    return " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if any(n in f for n in names))


def tree_allclose(a, b, *, rtol=1e-5, atol=1e-8) -> bool:
    """True when the trees have the same structure and every leaf pair is allclose."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb:
        return False
    return all(np.allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol) for x, y in zip(la, lb))


def assert_tree_allclose(a, b, *, rtol=1e-5, atol=1e-8):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb, f"tree structures differ:\n{ta}\n{tb}"
    for i, (x, y) in enumerate(zip(la, lb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=f"leaf {i}")


def tree_norm(t) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(t)))


def tree_dot(a, b) -> jax.Array:
    return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tree_rel_err(a, b) -> float:
    """|a - b| / max(|b|, tiny) over whole trees."""
    diff = jax.tree.map(lambda x, y: x - y, a, b)
    return float(tree_norm(diff) / jnp.maximum(tree_norm(b), 1e-30))


def np_tree_norm(tree) -> float:
    """The Euclidean norm of a tree, in NumPy float64 (eager jnp compiled a program per operation and leaf shape)."""
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))))


def np_tree_sub(a, b):
    """``a - b`` leaf by leaf, in NumPy float64."""
    return jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)


def horizontal_basis(tangents, rtol: float = 1e-10) -> tuple[np.ndarray, int]:
    """``(B, rank)``: the columns of ``B`` an orthonormal basis of the orthogonal complement of the rows of
    ``tangents`` (the orbit tangents, ravelled: a ``(k, P)`` matrix), from an SVD in NumPy (eager ``jnp`` would
    compile each of its operations); ``rank`` counts the singular values above ``rtol`` times the largest."""
    _, s, vt = np.linalg.svd(np.asarray(tangents))
    rank = int(np.sum(s > rtol * s[0]))
    return vt[rank:].T, rank


def charge_identity_error(drift, pred) -> float:
    """The worst ``|drift - pred|`` over steps and entries of two trajectories of charges (``charge_drift``,
    ``charge_drift_predicted``: pytrees of arrays stacked over steps), relative to the step's largest ``|drift|`` in
    that leaf, floored at 1e-6 (a conserved component: both are rounding); ``inf`` where either holds a NaN or an
    infinity (a diverged run: ``max(0.0, nan)`` would have read 0)."""
    worst = 0.0
    for a, b in zip(jax.tree.leaves(drift), jax.tree.leaves(pred)):
        a, b = np.asarray(a), np.asarray(b)
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
            return float("inf")
        scale = np.max(np.abs(a).reshape(a.shape[0], -1), axis=1).reshape((-1,) + (1,) * (a.ndim - 1))
        worst = max(worst, float(np.max(np.abs(a - b) / np.maximum(scale, 1e-6))))
    return worst


def first_step_observables(tx, loss):
    """A jitted ``params -> observables`` of one update of the wrapper ``tx`` (a ``quotient_trajectory``) from its
    initial state, with the gradient and value of ``loss(params)``."""
    from quotient_sgd.optim import observables_of

    @jax.jit
    def observed(p):
        _, s = tx.update(jax.grad(loss)(p), tx.init(p), p, value=loss(p))
        return observables_of(s)

    return observed


def max_rel_change(y, y0) -> float:
    """max |y - y0| / max |y0| over arrays."""
    y, y0 = np.asarray(y), np.asarray(y0)
    return float(np.max(np.abs(y - y0)) / max(np.max(np.abs(y0)), 1e-30))


def load_trajectory(run_dir: str) -> dict:
    """``trajectory.npz`` of a run directory as a dict of numpy arrays."""
    with np.load(os.path.join(run_dir, "trajectory.npz")) as z:
        return {k: z[k] for k in z.files}


def load_metric_rows(run_dir: str) -> list[dict]:
    """The rows of ``metrics.jsonl`` of a run directory, as written."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoint_steps(run_dir: str) -> list[int]:
    """The steps saved under ``run_dir/checkpoints`` (finalised orbax steps), ascending."""
    d = os.path.join(run_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def kill_after_checkpoint(cmd: list[str], env: dict, run_dir: str, step: int, timeout: float) -> int:
    """Start ``cmd``, SIGKILL it as soon as a checkpoint of at least ``step`` exists in ``run_dir``; returns the
    process's exit code (``-SIGKILL`` when it was killed, anything else when it finished or timed out first)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        steps = checkpoint_steps(run_dir)
        if steps and steps[-1] >= step:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    return proc.wait()


def assert_sweeps_bitwise(sweep_a: str, sweep_b: str, num_members: int) -> None:
    """Every member's ``trajectory.npz`` of two sweep directories is bitwise equal, and its ``metrics.jsonl``
    rows are equal, ordered and never duplicated."""
    for i in range(num_members):
        da, db = (os.path.join(d, "members", f"{i:03d}") for d in (sweep_a, sweep_b))
        a, b = load_trajectory(da), load_trajectory(db)
        assert sorted(a) == sorted(b), f"member {i}"
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"member {i}: {k}")
        ra, rb = load_metric_rows(da), load_metric_rows(db)
        steps = [r["step"] for r in ra]
        assert steps == sorted(set(steps)), f"member {i}: duplicated or unordered metric rows"
        assert ra == rb, f"member {i}: lost or changed metric rows"


def read_tensorboard(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of the scalar events under ``run_dir/tensorboard``, as TensorBoard shows
    them: files in name order, and a ``SessionLog.START`` event at step ``s`` (``SummaryWriter(purge_step=s)``)
    hides the values of steps ``>= s`` read before it."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    d = os.path.join(run_dir, "tensorboard")
    for name in sorted(os.listdir(d)):
        with open(os.path.join(d, name), "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event()
            ev.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            if ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START:
                out = {k: [(s, v) for s, v in vals if s < ev.step] for k, vals in out.items()}
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((int(ev.step), float(v.simple_value)))
    return out


def tiny_settings(steps: int = 20, **over):
    """Validated settings of ``configs/tiny.py`` for fast runner tests: ``steps`` steps, plots off, three cheap
    observables, then ``over`` (flattened keys, e.g. ``**{"optim.lr": 0.5}``)."""
    from quotient_sgd.config import load_config, validate

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = load_config(os.path.join(root, "configs", "tiny.py"))
    c.steps = steps
    c.logging.plots = False
    c.observables.names = ("loss", "grad_norm", "charges")
    for k, v in over.items():
        c.update_from_flattened_dict({k: v})
    return validate(c)


def permutation_gauge_case(steps: int):
    """A float64 4-8-3 MLP classifier and SGD data for ``steps`` steps, for gauge_fix runs on its full group and on
    the group without its permutations.  Returns ``(full, noperm, outputs)``: ``outputs(tx, group)`` trains
    ``gauge_fix(tx, group)`` and returns the network's outputs on a fixed probe batch at every step."""
    import optax
    from flax import nnx

    from quotient_sgd import models
    from quotient_sgd.optim import gauge_fix, train
    from quotient_sgd.symmetry import Product

    model = models.MLP(4, (8,), 3, classifier=True, param_dtype=jnp.float64, rngs=nnx.Rngs(1))
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    full = model.symmetries()
    noperm = Product([c for c in full.components if c.continuous])
    key = jax.random.key(3)
    x = jax.random.normal(key, (steps, 16, 4), jnp.float64)
    y = jax.random.randint(jax.random.fold_in(key, 1), (steps, 16), 0, 3)
    probe = jax.random.normal(jax.random.key(9), (32, 4), jnp.float64)

    def lwo(p, batch):
        m = nnx.merge(gd, p, rest)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(m(batch[0]), batch[1])), m(probe)

    def outputs(tx, group):
        return train(lwo, params, gauge_fix(tx, group), (x, y), has_aux=True, donate=False)[2]["aux"]

    return full, noperm, outputs


def rescale_net():
    """A 3-6-2 ReLU net with one rescale per hidden unit (float32), its loss and a stack of four batches (leading
    axis: steps)."""
    from quotient_sgd.symmetry import Product, Rescale

    group = Product((Rescale(incoming=((("l0", "kernel"), 1), (("l0", "bias"), 0)), outgoing=((("l1", "kernel"), 0),),
                             name="r0"),))
    k0, k1 = jax.random.split(jax.random.key(0))
    params = {"l0": {"kernel": jax.random.normal(k0, (3, 6)), "bias": jnp.zeros((6,))},
              "l1": {"kernel": jax.random.normal(k1, (6, 2)), "bias": jnp.zeros((2,))}}
    x = jax.random.normal(jax.random.key(1), (4, 16, 3))
    data = (x, jnp.sin(x[..., :2]))

    def loss(p, batch):
        h = jax.nn.relu(batch[0] @ p["l0"]["kernel"] + p["l0"]["bias"][None, :])
        return jnp.mean(jnp.square(h @ p["l1"]["kernel"] + p["l1"]["bias"][None, :] - batch[1]))

    return group, params, data, loss


def dot_precisions(fn, *args) -> list:
    """The ``precision`` of every ``dot_general`` in the jaxpr of ``fn(*args)``, nested jaxprs included (what a
    program asks of an accelerator's matrix units)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(eqn.params.get("precision"))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


#: The experiment scripts' directory (``experiments/``; the test modules that load them put it on ``sys.path``).
EXPERIMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments")


def experiment_script(name: str):
    """``experiments/<name>.py`` loaded by path under its own module name: ``import <name>`` could find the config
    file of the same name in configs/ when a test before put that directory first on ``sys.path``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_experiment_script_{name}", os.path.join(EXPERIMENTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def never_run(*args, **kwargs):
    """A stand-in for an experiment's ``run`` in tests of overrides it must refuse before computing."""
    raise AssertionError("the experiment computed with overrides it should have refused")


def sweep_records(sw, **over) -> None:
    """The records of a finished two-member seed sweep directory ``sw`` (no trajectory: nothing is computed);
    ``over`` replaces settings (e.g. ``steps=3``)."""
    from quotient_sgd.config import Settings
    from quotient_sgd.runner._sweep import member_settings

    s = Settings().replace(**{"sweep.seed": (0, 1), **over})
    members = [{"seed": 0}, {"seed": 1}]
    for i, m in enumerate(members):
        d = sw / "members" / f"{i:03d}"
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(member_settings(s, i, m).to_dict()))
        (d / "run.json").write_text(json.dumps({"wall_s": None, "resumed_from": None, "diverged": None}))
        (d / "events.json").write_text("[]")
    (sw / "sweep.json").write_text(json.dumps({
        "config": s.to_dict(), "members": members, "num_devices": 1, "num_processes": 1, "members_per_device": 1,
        "schedule": [{"from_step": 0, "members_per_device": 1}], "decided": True, "measured_cost": {}}))
