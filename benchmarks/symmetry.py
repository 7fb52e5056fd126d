"""Cost of the quotient geometry relative to training: (horizontal projection + invariants) / (one gradient).

Measured for the Transformer (issue A's target: <= 0.2), and for the MLP and CNN for reference, in one process:
both sides jitted, warmed up, timed as the median of repeated calls made in turn (gradient, projection,
invariants in every repetition).

    python benchmarks/symmetry.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from quotient_sgd.models import CNN, MLP, Transformer


def _time_alternately(calls, reps=20):
    """Median seconds of each ``(f, args)`` in ``calls``, called in turn within every repetition, so that load on
    the machine hits all sides alike (timing one side after the other lets a change of load bias the ratio)."""
    for f, args in calls:
        jax.block_until_ready(f(*args))
    ts = [[] for _ in calls]
    for _ in range(reps):
        for t, (f, args) in zip(ts, calls):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in ts]


def measure(name, model, x, y, reps):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    G = model.symmetries()

    def loss(p):
        logp = nnx.merge(graphdef, p, rest)(x)
        return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1))

    grad = jax.jit(jax.grad(loss))
    g = grad(params)

    # two jitted programs, timed separately and summed: one program holding both has hung on XLA:CPU (README)
    horizontal = jax.jit(G.horizontal)
    invariants = jax.jit(G.invariants)

    t_grad, t_h, t_i = _time_alternately([(grad, (params,)), (horizontal, (params, g)), (invariants, (params,))],
                                         reps=reps)
    t_q = t_h + t_i
    print(f"{name:12s} gradient {t_grad * 1e3:8.2f} ms   horizontal+invariants {t_q * 1e3:8.2f} ms   "
          f"ratio {t_q / t_grad:6.3f}")
    return t_q / t_grad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    reps = 5 if args.quick else 20
    key = jax.random.key(0)
    tok = jax.random.randint(key, (64, 16), 0, 128)
    r = measure("transformer", Transformer(128, 128, 4, 2, 16, rngs=nnx.Rngs(0), mlp_ratio=4), tok,
                jnp.roll(tok, -1, axis=1), reps)
    measure("mlp", MLP(64, (256, 256), 10, classifier=True, rngs=nnx.Rngs(0)),
            jax.random.normal(key, (128, 64)), jnp.arange(128) % 10, reps)
    measure("cnn", CNN(1, (16, 32), 10, norm="layer", classifier=True, rngs=nnx.Rngs(0)),
            jax.random.normal(key, (64, 8, 8, 1)), jnp.arange(64) % 10, reps)
    print(f"transformer ratio {r:.3f} (target <= 0.2): {'OK' if r <= 0.2 else 'ABOVE TARGET'}")


if __name__ == "__main__":
    main()
