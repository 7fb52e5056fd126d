"""Experiment 4: spherical motion of scale-invariant blocks (THEORY section 2; Wan et al. 2021, Kosson et al.
2023).

A CNN with a LayerNorm after every conv (:class:`quotient_sgd.models.CNN`, ``norm="layer"``: each conv block is
scale invariant, a ``Scale`` symmetry) trained on scikit-learn's digits by mini-batch SGD with weight decay
``lambda``.  The raw weight norm of a scale-invariant block drifts and then settles where ``2 lambda |w|^2 ~
eta |g|^2``; the quotient observable that matters, the RMS angular update per step, settles at
``sqrt(2 eta lambda)``.  Reported: the measured equilibrium against the prediction, the time to reach it, the
norm (charge ``|w|^2 / 2``) trajectory, and the events the detectors raise on the run.  ``weight_decay`` must be
> 0 here (the equilibrium it is compared with is 0 without decay), although the rule listed below allows 0.

    python experiments/normalised_cnn.py [scale=paper]
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import _common as C  # noqa: E402
from quotient_sgd.data import batch_fn, digits  # noqa: E402
from quotient_sgd.diagnostics import detect  # noqa: E402
from quotient_sgd import observables as obs  # noqa: E402
from quotient_sgd.models import CNN  # noqa: E402
from quotient_sgd.optim import SGDSpec, quotient_trajectory, train  # noqa: E402
from quotient_sgd.optim import flatten_trajectory as _flat  # noqa: E402


def _xent(graphdef, params, batch):
    logp = nnx.merge(graphdef, params)(batch["x"])
    nll = -jnp.take_along_axis(logp, batch["y"][:, None], axis=-1)[:, 0]
    return jnp.sum(batch["w"] * nll) / jnp.sum(batch["w"])


def run(cfg):
    ds = digits(seed=cfg.seed, layout="image")
    model = CNN(1, tuple(cfg.channels), 10, norm=cfg.norm, classifier=True, rngs=nnx.Rngs(cfg.seed))
    graphdef, params, group = C.split_model(model)
    loss = functools.partial(_xent, graphdef)
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.sgd(cfg.lr))
    qtx = quotient_trajectory(tx, group, observables=["loss", "grad_norm", "angular_update", "charges"],
                              spec=SGDSpec(cfg.lr, weight_decay=cfg.weight_decay))
    data = batch_fn(ds, cfg.batch_size)
    key = jax.random.key(cfg.seed)
    # compiled before the timed call (the same computation, bit for bit): the seconds timed its compilation too,
    # about 2 s of the 2.8 s of a 200-step run
    compiled = jax.jit(lambda p, k: train(loss, p, qtx, data, num_steps=cfg.num_steps, key=k, donate=False)).lower(
        params, key).compile()
    t0 = time.perf_counter()
    params, _, traj = compiled(params, key)
    jax.block_until_ready(traj)
    wall = time.perf_counter() - t0
    traj = {k: np.asarray(v) for k, v in _flat(traj).items()}
    # the charges after the last step: row k of the trajectory holds those before step k, so its last row is the
    # norm one step before the end (|w|^2 "end" of a 1-step run was its start)
    final_charges = {k: np.asarray(v) for k, v in _flat(obs.charges(group, params)).items()}
    logp = nnx.merge(graphdef, params)(ds.x_test)
    test_acc = float(jnp.mean((jnp.argmax(logp, -1) == ds.y_test).astype(jnp.float32)))
    events = detect(traj, kinds=["transition", "loss_spike", "divergence"], block=max(1, cfg.num_steps // 100),
                    spike_smooth=cfg.spike_smooth)
    return dict(traj=traj, events=events, wall=wall, test_acc=test_acc, final_charges=final_charges)


def running_rms(ang, window: int = 50):
    """The RMS of the per-step angle over a sliding ``window`` of steps (``len(ang) - window + 1`` values; entry
    ``i`` ends at step ``i + window - 1``; none for a series shorter than ``window``).  The equilibrium holds for
    the mean square of the angle, ``eta^2 |g|^2 / |w|^2 ~ 2 eta lambda``: the mean angle is smaller by the spread of
    the per-step angle (Jensen)."""
    ang = np.asarray(ang, np.float64)
    if len(ang) < window:
        # (np.convolve's "valid" mode swaps its arguments when the series is the shorter one: 30 steps of a constant
        # angle gave 21 values of sqrt(30 / 50) times it, and the table a step "within 10%" past the run's end)
        return np.zeros(0)
    return np.sqrt(np.convolve(np.square(ang), np.ones(window) / window, mode="valid"))


def summarise(cfg, out):
    tr = out["traj"]
    pred = float(np.sqrt(2 * cfg.lr * cfg.weight_decay))
    n = len(tr["loss"])
    # the last ceil(tail_fraction n) steps (at least one), the product rounded to 9 decimals first: int(n (1 - f))
    # floored a rounding error, 10 x (1 - 0.9) = 0.99999... -> 0, so tail_fraction=0.9 read 10 of 10 steps (91 of
    # 100), and a tail under one step (f = 1e-17) was empty: a NaN RMS
    tail = slice(n - max(1, math.ceil(round(cfg.tail_fraction * n, 9))), n)
    rows = []
    for k in sorted(tr):
        if not k.startswith("angular_update/"):
            continue
        name = k.split("/", 1)[1]
        ang = tr[k]
        sm = running_rms(ang)
        reach = np.nonzero(np.abs(sm / pred - 1) < 0.1)[0]
        q = tr.get(f"charges/{name}")
        end = out.get("final_charges", {}).get(name, q[-1] if q is not None else None)
        rms = float(np.sqrt(np.mean(np.square(ang[tail]))))
        rows.append({
            "block": name, "predicted sqrt(2 eta lambda)": pred, "measured RMS angle (tail)": rms,
            "ratio": rms / pred, "mean angle (tail)": float(np.mean(ang[tail])),
            "steps to within 10%": int(reach[0]) + 49 if reach.size else "not reached",
            "|w|^2 start": float(2 * np.sum(q[0])) if q is not None else None,
            "|w|^2 end": float(2 * np.sum(end)) if end is not None else None,
        })
    return rows


def figure(cfg, out, path):
    plt = C.plt()
    tr = out["traj"]
    pred = np.sqrt(2 * cfg.lr * cfg.weight_decay)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for k in sorted(tr):
        if k.startswith("angular_update/"):
            sm = running_rms(tr[k])
            axes[0].plot(np.arange(len(sm)) + 49, sm, label=k.split("/", 1)[1])
        if k.startswith("charges/scale"):
            axes[1].plot(2 * tr[k].reshape(len(tr[k]), -1).sum(-1), label=k.split("/", 1)[1])
    axes[0].axhline(pred, color="k", ls="--", label="sqrt(2 eta lambda)")
    axes[0].set(title="RMS angular update per step (over 50 steps)", xlabel="step")
    axes[1].set(title="|w|^2 of the scale-invariant blocks (raw)", xlabel="step", yscale="log")
    axes[2].semilogy(tr["loss"], lw=0.5)
    C.mark_events(axes[2], out["events"])
    axes[2].set(title=f"train loss (test acc {out['test_acc']:.3f}); dashed: events", xlabel="step")
    for a in axes[:2]:
        a.legend(fontsize=7)
    C.save_figure(fig, path)


def check_config(cfg) -> None:
    """``SystemExit`` naming ``weight_decay`` when it is 0: the experiment compares the angular update with its
    equilibrium ``sqrt(2 lr weight_decay)``, which is 0 without decay (the run trained, then its table failed in a
    bare ``ZeroDivisionError``; the rules of ``_common`` allow 0 for the other experiments' ``weight_decay``)."""
    if not cfg.weight_decay > 0:
        raise SystemExit(f"normalised_cnn: weight_decay={cfg.weight_decay!r}: allowed a finite number > 0 (the "
                         "equilibrium angular update sqrt(2 lr weight_decay) it is compared with needs decay)")


def main(argv=None):
    cfg = C.load_config("normalised_cnn", argv, results=True)
    check_config(cfg)  # before anything is computed
    out = run(cfg)
    rows = summarise(cfg, out)
    d = C.save("normalised_cnn", out["traj"], out["events"], rows,
               {"test_acc": out["test_acc"], "wall_s": out["wall"],
                "events": [(e.step, e.kind, e.variant, e.details.get("observable")) for e in out["events"]]},
               files={"normalised_cnn.png": lambda p: figure(cfg, out, p)})
    print(C.markdown_table(rows))
    print("test acc", out["test_acc"], "events", [(e.step, e.kind, e.details.get("observable")) for e in out["events"]])
    print("written to", d)


if __name__ == "__main__":
    main()
