"""Experiment 6: shock-aware learning rate (:func:`quotient_sgd.diagnostics.shock_aware_lr`) versus constant
and cosine schedules at equal step budget, on the catapult setting (wide two-layer ReLU net, full-batch GD,
base lr = 3 / lambda0).  Reported: final loss, number of loss spikes (``loss_spike`` detector), wall time.

    python experiments/shock_lr.py [scale=paper]
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import _common as C  # noqa: E402
import catapult as exp2  # noqa: E402  (experiments/catapult.py is found first on sys.path)
from quotient_sgd.diagnostics import detect, shock_aware_lr  # noqa: E402
from quotient_sgd.optim import train  # noqa: E402


def _cosine(lr, n, count):
    """``lr (1 + cos(pi t / n)) / 2`` (optax's cosine_decay_schedule, written with explicit dtypes so that it
    also runs under strict dtype promotion)."""
    t = jnp.minimum(jnp.asarray(count, jnp.float32), jnp.float32(n)) / jnp.float32(n)
    return jnp.float32(lr) * 0.5 * (1.0 + jnp.cos(jnp.float32(np.pi) * t))


def optimisers(cfg, lr):
    n = cfg.num_steps
    return {
        "constant": optax.sgd(lr),
        "cosine": optax.sgd(functools.partial(_cosine, lr, n)),
        "shock-aware cap": shock_aware_lr(optax.sgd(lr), fold_target=cfg.fold_target, policy="cap",
                                          init_scale=cfg.init_scale),
        "shock-aware track": shock_aware_lr(optax.sgd(lr), fold_target=cfg.track_target, policy="track",
                                            max_scale=cfg.max_scale, init_scale=cfg.init_scale),
    }


def run_one(cfg, seed):
    pc = cfg.problem.copy_and_resolve_references()
    pc.seed = seed
    graphdef, params, group, batch, loss, lam0 = exp2.setup(pc)
    lr = cfg.eta_lambda0 / lam0
    data = functools.partial(C._const_batch, batch)
    rows = []
    for name, tx in optimisers(cfg, lr).items():
        train(loss, params, tx, data, num_steps=cfg.num_steps, donate=False)  # compile
        t0 = time.perf_counter()
        _, _, traj = train(loss, params, tx, data, num_steps=cfg.num_steps, donate=False)
        l = np.asarray(jax.block_until_ready(traj["loss"]))
        wall = time.perf_counter() - t0
        # each event names its run (details "schedule", "seed"), as experiment 1's name theirs
        spikes = [dataclasses.replace(e, details={**e.details, "schedule": name, "seed": seed})
                  for e in detect({"loss": l}, kinds=["loss_spike"], spike_factor=cfg.spike_factor)]
        rows.append({"seed": seed, "schedule": name, "final loss": float(l[-1]), "max loss / initial": float(
            np.nanmax(l) / l[0]), "loss spikes": len(spikes), "wall_s": wall, "loss": l, "events": spikes})
    return rows


#: Keys of the catapult problem (``problem.*``) that this experiment does not read, with its own key that sets what
#: they would: ``problem.eta_lambda0=2`` kept the base lr at 3 / lambda0 and ``problem.seed=1``,
#: ``problem.num_steps``, ``problem.spike_factor`` changed nothing, while ``result.json`` recorded them as given.
UNREAD_PROBLEM_KEYS = {
    "seed": "seeds=[...]",
    "eta_lambda0": "eta_lambda0=... (the base lr of every schedule)",
    "num_steps": "num_steps=...",
    "spike_factor": "spike_factor=...",
    "hessian_every": "nothing here (no Hessian is recorded)",
    "drop_factor": "nothing here (no catapult detector runs)",
}
C.UNREAD_KEYS["shock_lr"] = {f"problem.{k}": v for k, v in UNREAD_PROBLEM_KEYS.items()}  # (shown by --help)


def check_overrides(overrides) -> None:
    """``SystemExit`` naming the key and the one to set instead when the command line's ``overrides``
    (``{key: value}``, :func:`_common.parse_overrides`) set a ``problem.*`` key this experiment does not read
    (:data:`UNREAD_PROBLEM_KEYS`)."""
    for k, v in overrides.items():
        parts = k.split(".")
        if len(parts) == 2 and parts[0] == "problem" and parts[1] in UNREAD_PROBLEM_KEYS:
            raise SystemExit(f"shock_lr: problem.{parts[1]}={v!r}: experiment 6 does not read the catapult "
                             f"problem's {parts[1]}; set {UNREAD_PROBLEM_KEYS[parts[1]]}")


def run(cfg):
    return [r for s in cfg.seeds for r in run_one(cfg, s)]


def figure(rows, path, eta_lambda0: float = 3.0):
    """The first seed's loss curves, titled with the base lr ``eta_lambda0 / lambda0`` the runs used (the title
    said 3 / lambda0 whatever ``eta_lambda0`` was) and the seed shown."""
    plt = C.plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["seed"] == rows[0]["seed"]:
            ax.semilogy(r["loss"], label=r["schedule"])
    ax.set(xlabel="step", ylabel="loss",
           title=f"catapult setting, base lr = {eta_lambda0:g} / lambda0 (seed {rows[0]['seed']})")
    ax.legend()
    C.save_figure(fig, path)


def main(argv=None):
    cfg = C.load_config("shock_lr", argv, results=True)
    check_overrides(C._LOADED["shock_lr"]["overrides"])
    rows = run(cfg)
    table = [{k: v for k, v in r.items() if k not in ("loss", "events")} for r in rows]
    # events.json holds the loss spikes the table counts (it was written empty)
    d = C.save("shock_lr", {"loss_" + r["schedule"].replace(" ", "_") + f"_{r['seed']}": r["loss"] for r in rows},
               [e for r in rows for e in r["events"]], table,
               files={"shock_lr.png": lambda p: figure(rows, p, cfg.eta_lambda0)})
    print(C.markdown_table(table))
    print("written to", d)


if __name__ == "__main__":
    main()
