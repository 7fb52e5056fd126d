"""Experiment 1: the edge of stability seen on the quotient (THEORY section 4; Cohen et al. 2021).

Full-batch GD on a ReLU MLP (teacher-student regression).  The sharpness the step sees, ``lr * lambda_max`` of
the horizontal Hessian at the current point, rises to 2 and hovers there.  A twin starts from a randomly
re-gauged copy of the same initial function (same function, unbalanced charges): its step sees a different
curvature from the start, reaches the edge at a different canonical (function) sharpness, and the decomposition
``lr lambda_step = lr lambda_canonical x gauge_factor`` with the charge prediction of the gauge factor says why.

    python experiments/edge_of_stability.py [scale=paper] [num_steps=...]
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import _common as C  # noqa: E402
from quotient_sgd.diagnostics import detect  # noqa: E402
from quotient_sgd.models import MLP  # noqa: E402
from quotient_sgd.optim import SGDSpec  # noqa: E402

OBS = "curvature"  # see _common.record


def setup(cfg):
    key = jax.random.key(cfg.seed)
    kx, kg = jax.random.split(key)
    x = jax.random.normal(kx, (cfg.num_examples, cfg.input_dim))
    teacher = MLP(cfg.input_dim, (cfg.teacher_hidden,), 1, activation="tanh", rngs=nnx.Rngs(cfg.seed + 1))
    y = cfg.teacher_gain * teacher(x)
    graphdef, params, group = C.split_model(
        MLP(cfg.input_dim, tuple(cfg.hidden), 1, activation="relu", rngs=nnx.Rngs(cfg.seed + 2)))
    twin = group.act(group.sample(kg, params, scale=cfg.twin_scale), params)
    check_twin(cfg, graphdef, params, twin, x)
    return graphdef, params, twin, group, (x, y)


def check_twin(cfg, graphdef, params, twin, x) -> None:
    """``SystemExit`` naming ``twin_scale`` when the re-gauged twin is not the initial function in the parameters'
    precision: its rescale factors ``exp(+-2 twin_scale)`` overflowed (``twin_scale=40``: every float32 twin
    parameter inf or NaN), and the twin's NaN loss was tabulated as a run that "diverged at" step 0."""
    leaves = jax.tree.leaves(twin)
    f0, f1 = (np.asarray(nnx.merge(graphdef, p)(x), np.float64) for p in (params, twin))
    finite = all(bool(np.all(np.isfinite(np.asarray(v)))) for v in leaves) and bool(np.all(np.isfinite(f1)))
    dev = float(np.max(np.abs(f1 - f0))) if finite else float("inf")
    scale = float(np.max(np.abs(f0))) if f0.size else 0.0
    if not dev <= 1e-3 * max(1.0, scale):
        what = ("has parameters that are not finite" if not finite
                else f"differs from the initial function by {dev:.3g} (outputs up to {scale:.3g})")
        raise SystemExit(f"edge_of_stability: twin_scale={cfg.twin_scale!r}: the re-gauged twin {what}: its rescale "
                         f"factors exp(+-2 twin_scale) leave the parameters' precision "
                         f"({np.dtype(leaves[0].dtype).name}); allowed: a twin_scale whose twin is the same function, "
                         f"e.g. <= 10 (the default 0.3)")


def learning_rate(cfg, loss, params, group, batch) -> tuple[float, float]:
    """``(lr, lambda0)``: ``lambda0 = lambda_step(theta_0)`` of the balanced run (the horizontal sharpness from
    :func:`_common.decomposition_fn`'s Lanczos with ``cfg.lanczos`` vectors and key 0) and ``lr = cfg.eta_lambda0 /
    lambda0``; experiment 5 trains its MLP at this learning rate through this function."""
    lam0 = float(C.decomposition_fn(loss, batch, group, cfg.lanczos, raw=True)(params, jax.random.key(0))
                 ["sharpness_horizontal"])
    return cfg.eta_lambda0 / lam0, lam0


def run(cfg):
    graphdef, params, twin, group, batch = setup(cfg)
    loss = functools.partial(C.mse, graphdef)
    lr, lam0 = learning_rate(cfg, loss, params, group, batch)
    tx = optax.sgd(lr)
    res = {}
    for name, p0 in (("balanced", params), ("regauged", twin)):
        _, traj, wall = C.record(loss, p0, tx, group, batch, cfg.num_steps, lr=lr, hessian_every=cfg.hessian_every,
                                 lanczos=cfg.lanczos, observables=OBS, spec=SGDSpec(lr), seed=cfg.seed)
        events = detect(traj, lr=lr, kinds=["edge_of_stability", "fold", "catapult", "loss_spike", "divergence"])
        res[name] = dict(traj=traj, events=events, wall=wall)
    return dict(lr=lr, lambda0=lam0, runs=res, cfg=cfg)


def summarise(out):
    lr = out["lr"]
    rows = []
    for name, r in out["runs"].items():
        tr, ev = r["traj"], r["events"]
        # every key at the same refreshes (C.sampled drops each key's own non-finite records, which misaligned the
        # keys against the steps of sharpness_horizontal wherever one key alone was NaN, e.g. a NaN gauge factor)
        refresh = tr["hessian_step"] == tr["step"]
        s = tr["step"][refresh]
        lam_s, lam_c, lam_r, gf, gfc = (tr[k][refresh] for k in (
            "sharpness_horizontal", "sharpness_quotient", "sharpness_raw", "gauge_factor", "gauge_factor_charges"))
        div = C.first(ev, "divergence")
        e2 = C.first(ev, "edge_of_stability", "step", level=2.0)
        e2q = C.first(ev, "edge_of_stability", "quotient", level=2.0)
        e2r = C.first(ev, "edge_of_stability", "raw", level=2.0)
        hover = s >= (e2.step if e2 else s[-1] + 1)
        loss = tr["loss"]
        nonmono = int(np.argmax(np.diff(loss) > 0)) + 1 if np.any(np.diff(loss) > 0) else -1
        rows.append({
            "run": name,
            "lr*lambda_step(0)": lr * lam_s[0], "lr*lambda_canonical(0)": lr * lam_c[0],
            "lr*lambda_raw(0)": lr * lam_r[0], "gauge(0)": gf[0], "gauge_charges(0)": gfc[0],
            "EoS step (detector, step variant)": e2.step if e2 else "missed",
            "EoS step (canonical variant)": e2q.step if e2q else "none",
            "EoS step (raw variant)": e2r.step if e2r else "none",
            "first loss increase": nonmono,
            "mean lr*lambda_step at edge": float(np.mean(lr * lam_s[hover])) if hover.any() else float("nan"),
            "lambda_canonical at edge": float(lam_c[s == e2.step][0]) if e2 else float("nan"),
            "lambda_raw at edge": float(lam_r[s == e2.step][0]) if e2 else float("nan"),
            "gauge at edge": float(gf[s == e2.step][0]) if e2 else float("nan"),
            "gauge_charges at edge": float(gfc[s == e2.step][0]) if e2 else float("nan"),
            "mean gauge on edge": float(np.mean(gf[hover])) if hover.any() else float("nan"),
            "mean gauge_charges on edge": float(np.mean(gfc[hover])) if hover.any() else float("nan"),
            "final loss": float(loss[-1]), "diverged at": div.step if div else "no", "wall_s": r["wall"],
        })
    return rows


def figure(out, path):
    plt = C.plt()
    lr = out["lr"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for (name, r), col in zip(out["runs"].items(), ("tab:blue", "tab:orange")):
        tr = r["traj"]
        axes[0].semilogy(tr["loss"], color=col, label=name)
        for key, ls in (("sharpness_horizontal", "-"), ("sharpness_quotient", "--"), ("sharpness_raw", ":")):
            s, v = C.sampled(tr, key)
            axes[1].plot(s, lr * v, ls, color=col, label=f"{name}: lr*{key.split('_')[1]}")
        s, gf = C.sampled(tr, "gauge_factor")
        _, gfc = C.sampled(tr, "gauge_factor_charges")
        axes[2].plot(s, gf, "-", color=col, label=f"{name}: measured")
        axes[2].plot(s, gfc, "--", color=col, label=f"{name}: from charges")
        C.mark_events(axes[1], [e for e in r["events"] if e.kind == "edge_of_stability" and e.variant == "step"])
    axes[1].axhline(2.0, color="k", lw=0.8)
    axes[0].set(title="loss (full-batch GD)", xlabel="step")
    axes[1].set(title="lr * lambda_max: step (-), canonical (--), raw (:)", xlabel="step")
    axes[2].set(title="gauge factor lambda_step / lambda_canonical", xlabel="step")
    for a in axes:
        a.legend(fontsize=7)
    C.save_figure(fig, path)


def labelled_events(out) -> list:
    """Both runs' events, each with ``details["run"]`` naming its run (``"balanced"``: ``trajectory.npz``,
    ``"regauged"``: ``trajectory_regauged.npz``).  ``events.json`` held the two lists joined without it, so the
    twin's edge at step 6 read as one more edge of the balanced run, whose trajectory alone gives it no such event."""
    return [dataclasses.replace(e, details={**e.details, "run": name})
            for name in ("balanced", "regauged") for e in out["runs"][name]["events"]]


def main(argv=None):
    cfg = C.load_config("edge_of_stability", argv, results=True)
    out = run(cfg)
    rows = summarise(out)
    d = C.save("edge_of_stability", out["runs"]["balanced"]["traj"], labelled_events(out), rows,
               {"lr": out["lr"], "lambda0": out["lambda0"]},
               files={"trajectory_regauged.npz": lambda p: np.savez_compressed(p, **out["runs"]["regauged"]["traj"]),
                      "edge_of_stability.png": lambda p: figure(out, p)})
    print(C.markdown_table(rows))
    print("written to", d)


if __name__ == "__main__":
    main()
