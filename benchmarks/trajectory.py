"""Cost of the quotient observables, on CPU, for an MLP, a CNN and a Transformer.

Prints, per model, measured in the same process:

- ``step ratio (full)`` = (one training step recording every default observable) / (the same optax step without
  them), both inside one jitted ``lax.scan`` (``train``, 100 steps a call, the optimiser's init included), SGD
  with momentum 0.9: the issue's target;
- ``step ratio (cheap)``: the same with only the default observables that need neither the canonical point nor
  the vertical projection (:data:`CHEAP`); the per-call times of the group's ``canonical_element`` and
  ``vertical`` are printed too;
- ``Lanczos ratio`` = (20 Lanczos iterations, one jitted call) / (one jitted gradient), for the raw Hessian and
  for the horizontal Hessian P H P (skipped when the projection alone would take > 20 s); the batch is an
  argument of both jitted calls, as inside training.

Targets (issue 3): step ratio <= 1.10 (stretch 1.05); lanczos ratio <= 45.

Allocation matters on these CPUs, so every measurement runs twice, in fresh subprocesses: once with glibc's
default malloc and once with ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296
MALLOC_TOP_PAD_=268435456`` set before start.

    python benchmarks/trajectory.py            # both settings, all models
    python benchmarks/trajectory.py --child mlp   # one measurement in this process (used internally)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

MALLOC_TUNED = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "4294967296",
    "MALLOC_TOP_PAD_": "268435456",
}
MODELS = ("mlp", "cnn", "transformer")


def _setup(name):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from quotient_sgd import models

    key = jax.random.key(0)
    if name == "mlp":
        model = models.MLP(64, (256, 256), 10, classifier=True, rngs=nnx.Rngs(0))
        x = jax.random.normal(key, (4096, 64))
        y = jax.random.randint(jax.random.fold_in(key, 1), (4096,), 0, 10)
        bsz = 128
    elif name == "cnn":
        model = models.CNN(1, (16, 32), 10, classifier=True, rngs=nnx.Rngs(0))
        x = jax.random.normal(key, (2048, 8, 8, 1))
        y = jax.random.randint(jax.random.fold_in(key, 1), (2048,), 0, 10)
        bsz = 64
    else:
        model = models.Transformer(64, 64, 4, 2, 32, rngs=nnx.Rngs(0))
        x = jax.random.randint(key, (1024, 33), 0, 64)
        y = None
        bsz = 16
    graphdef, params = nnx.split(model, nnx.Param)
    group = model.symmetries()
    n = x.shape[0]

    def batch_fn(step, key):
        i = (step * bsz) % (n - bsz)
        xb = jax.lax.dynamic_slice_in_dim(x, i, bsz)
        if y is None:
            return xb
        return xb, jax.lax.dynamic_slice_in_dim(y, i, bsz)

    def loss_fn(p, batch):
        m = nnx.merge(graphdef, p)
        if y is None:
            logits = m(batch[:, :-1])
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]))
        xb, yb = batch
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(m(xb), yb))

    return params, group, batch_fn, loss_fn


def _best(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


#: The default observables that need no canonical representative and no vertical projection of the update.
CHEAP = ("loss", "grad_norm", "charges", "charge_drift", "charge_drift_predicted", "angular_update", "curvature",
         "shock_number", "fold_number")


def child(name: str, steps: int = 100, reps: int = 3) -> dict:
    import jax
    import optax

    from quotient_sgd import observables as qobs
    from quotient_sgd.optim import SGDSpec, quotient_trajectory, train

    params, group, batch_fn, loss_fn = _setup(name)
    plain = optax.sgd(0.05, momentum=0.9)
    spec = SGDSpec(0.05, momentum=0.9)
    cheap = quotient_trajectory(plain, group, spec=spec, observables=CHEAP)
    full = quotient_trajectory(plain, group, spec=spec)
    out = {"model": name, "params": int(sum(x.size for x in jax.tree.leaves(params)))}

    def timed(f, n, reps=reps):
        jax.block_until_ready(f())  # compile / warm up
        return _best(lambda: [jax.block_until_ready(f()) for _ in range(n)], reps) / n

    # (1) the real thing: steps inside one jitted lax.scan, plain vs the cheap default observables
    for label, tx in (("plain", plain), ("cheap", cheap), ("full", full)):
        out[f"step_{label}_ms"] = 1e3 * timed(
            lambda tx=tx: train(loss_fn, params, tx, batch_fn, num_steps=steps, donate=False), 1) / steps
    out["step_ratio_cheap"] = out["step_cheap_ms"] / out["step_plain_ms"]
    out["step_ratio_full"] = out["step_full_ms"] / out["step_plain_ms"]

    # (2) per-call costs of the group operations behind the canonical-point and projection observables
    # The batch is an argument of every jitted call, as inside training (a batch captured as a constant was
    # measured to make XLA:CPU run the looped Lanczos ~5x slower on the MLP: 92 vs 18 ms).
    batch = batch_fn(jax.numpy.int32(0), None)
    grad = jax.jit(lambda p, b: jax.grad(loss_fn)(p, b))
    g = grad(params, batch)
    out["grad_ms"] = 1e3 * timed(lambda: grad(params, batch), 20)
    for label, f in (("canonical_element", jax.jit(group.canonical_element)),
                     ("vertical", jax.jit(lambda p: group.vertical(p, g)))):
        out[f"{label}_ms"] = 1e3 * timed(lambda f=f: f(params), 5)

    # (3) K = 20 Lanczos vs one gradient
    def lanczos(where):
        def f(p, b):
            lf = lambda q: loss_fn(q, b)  # noqa: E731
            if where == "raw":
                return qobs.sharpness_raw(lf, p, key=jax.random.key(1), num_matvecs=20).top
            return qobs.sharpness_horizontal(lf, group, p, key=jax.random.key(1), num_matvecs=20).top
        return jax.jit(f)

    raw = lanczos("raw")
    out["lanczos_raw_ms"] = 1e3 * timed(lambda: raw(params, batch), 3)
    out["lanczos_raw_ratio"] = out["lanczos_raw_ms"] / out["grad_ms"]
    proj = jax.jit(lambda p: qobs.frozen_horizontal(group, p)(g))
    out["projection_ms"] = 1e3 * timed(lambda: proj(params), 1, 1)
    if 40 * out["projection_ms"] < 20000:
        hor = lanczos("horizontal")
        out["lanczos_ms"] = 1e3 * timed(lambda: hor(params, batch), 1)
        out["lanczos_ratio"] = out["lanczos_ms"] / out["grad_ms"]
    else:
        out["lanczos_ms"] = out["lanczos_ratio"] = float("nan")
    return out


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", metavar="MODEL",
                    help=f"models to measure, any of {', '.join(MODELS)} (default: all)")
    ap.add_argument("--child", choices=MODELS, help="measure one model in this process and print its RESULT line "
                    "(used internally: each measurement runs in a fresh subprocess)")
    args = ap.parse_args(argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        ap.error(f"MODEL: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(MODELS)}")
    if args.child and args.models:
        ap.error(f"--child measures one model, the one it names ({args.child}); MODEL arguments "
                 f"({', '.join(args.models)}) would be ignored: drop them, or drop --child to measure them in "
                 f"subprocesses")
    if args.child:
        print("RESULT " + json.dumps(child(args.child)), flush=True)
        return
    models = args.models or list(MODELS)
    rows, failed = [], []
    for setting, extra in (("default malloc", {}), ("tuned malloc", MALLOC_TUNED)):
        env = {k: v for k, v in os.environ.items() if k not in MALLOC_TUNED}
        env.update(extra)
        env.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
        for m in models:
            proc = subprocess.run([sys.executable, __file__, "--child", m], env=env, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"{setting} {m}: FAILED\n{proc.stderr[-2000:]}")
                failed.append(f"{m} ({setting})")
                continue
            r = json.loads(line[0][7:])
            r["setting"] = setting
            rows.append(r)
            print(
                f"{setting:15s} {m:12s} P={r['params']:7d} | step plain {r['step_plain_ms']:.3f} ms, all default "
                f"observables {r['step_full_ms']:.3f} ms: ratio {r['step_ratio_full']:.2f} (cheap set "
                f"{r['step_ratio_cheap']:.2f}) [canonical_element {r['canonical_element_ms']:.2f} ms, "
                f"vertical {r['vertical_ms']:.2f} ms] | grad {r['grad_ms']:.3f} ms, Lanczos20 raw H ratio "
                f"{r['lanczos_raw_ratio']:.1f}, P H P ratio {r['lanczos_ratio']:.1f} "
                f"[projection {r['projection_ms']:.1f} ms]",
                flush=True,
            )
    print("targets: step ratio <= 1.10 (stretch 1.05); Lanczos20 / gradient <= 45")
    if failed:  # (exit status 1: a measurement that failed is not a result; it had exited 0)
        raise SystemExit(f"trajectory.py: {len(failed)} measurement(s) failed: {', '.join(failed)}")
    return rows


if __name__ == "__main__":
    main()
