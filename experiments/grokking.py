"""Experiment 3: grokking (delayed generalisation) on modular addition, and what the change-point detector sees.

A one-layer Transformer (:class:`quotient_sgd.models.Transformer`) trained full-batch with AdamW and weight decay
on half of the pairs ``(a, b)``: the training accuracy reaches 1 early, the test accuracy jumps much later.  Every
``eval_every`` steps the recorder evaluates orbit-invariant observables -- the canonical gradient norm and the
norms of each symmetry component's invariant features (``W_Q W_K^T``, ``W_V W_O``, per-unit ``|w_in||w_out|``)
-- and the held-out accuracy.  The ``transition`` detector (calibrated CUSUM, false-alarm rate ``alpha`` over the
run) reads only the training-side quotient observables; its events are placed against the test-accuracy jump.

    python experiments/grokking.py [scale=paper] [p=...]
"""

from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import _common as C  # noqa: E402
from quotient_sgd import observables as obs  # noqa: E402
from quotient_sgd.data import modular_arithmetic  # noqa: E402
from quotient_sgd.diagnostics import detect  # noqa: E402
from quotient_sgd.models import Transformer  # noqa: E402


def _quotient_obs(graphdef, group, batch, params):
    loss = functools.partial(C.xent, graphdef)
    g = jax.grad(loss)(params, batch)
    return {"grad_norm_canonical": obs.grad_norm_canonical(group, params, g), "grad_norm": obs.grad_norm(g),
            **{f"invariant_norms/{k}": v for k, v in obs.invariant_norms(group, params).items()}}


def run(cfg):
    ds = modular_arithmetic(seed=cfg.seed, p=cfg.p, train_fraction=cfg.train_fraction, encoding="tokens")
    graphdef, params, group = C.split_model(Transformer(cfg.p + 1, cfg.d_model, cfg.num_heads, cfg.num_layers, 3,
                                                        rngs=nnx.Rngs(cfg.seed)))
    train_b, test_b = (ds.x_train, ds.y_train), (ds.x_test, ds.y_test)
    loss = functools.partial(C.xent, graphdef)
    evals = {
        "train_accuracy": functools.partial(C.accuracy, graphdef, batch=train_b),
        "test_accuracy": functools.partial(C.accuracy, graphdef, batch=test_b),
        "test_loss": functools.partial(C.xent, graphdef, batch=test_b),
        "q": functools.partial(_quotient_obs, graphdef, group, train_b),
    }
    evals = {k: (lambda f: (lambda p: f(params=p)) if k != "q" else f)(f) for k, f in evals.items()}
    tx = optax.adamw(cfg.lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    _, traj, wall = C.record(loss, params, tx, group, train_b, cfg.num_steps, hessian_every=cfg.eval_every,
                             observables=["loss", "grad_norm"], decomposition=False, evals=evals, seed=cfg.seed)
    # the evaluations' raw gradient norm is the recorder's per-step one at the evaluated steps: the change points
    # read the evaluations' copy, the trajectory keeps the per-step one (renamed over it, "q/grad_norm" replaced the
    # per-step gradient norm in trajectory.npz by NaN at every step but the evaluated ones)
    q_grad = traj.pop("q/grad_norm")
    for k in list(traj):
        if k.startswith("q/"):
            traj[k[2:]] = traj.pop(k)
    sub = C.subsample(traj, [k for k in traj if k not in ("hessian_step", "grad_norm")])
    sub["grad_norm"] = q_grad[traj["hessian_step"] == traj["step"]]
    events = detect(sub, kinds=["transition"], block=1, alpha=cfg.alpha)
    events += detect({"loss": traj["loss"]}, kinds=["loss_spike", "divergence"])  # on the per-step loss
    return dict(traj=traj, sub=sub, events=events, wall=wall)


def ground_truth(sub):
    """On the test accuracy smoothed by a running median of 5 evaluations: memorisation step (train accuracy
    >= 0.99) and the test-accuracy jump after it: ``grok_end`` = first step
    with test accuracy >= 0.9 x its maximum; ``grok_start`` = the last step before it with test accuracy at least
    0.25 below the value at ``grok_end`` (where the final rise starts); ``grok_mid`` = first step half-way
    between the two accuracies.  ``grokked``: the maximum exceeds 0.8 and the rise happens >= 500 steps after
    memorisation.  A run whose test accuracy never comes within 0.9 x its maximum after memorisation (it peaked
    before) has no jump, nor has one with no step 0.25 below ``grok_end``'s value before it (a test accuracy that
    stays flat, e.g. 0 after memorising, or rises by less than 0.25 in all), nor one already within 0.9 x its
    maximum at the evaluation before memorisation (it generalised first): ``grok_*`` stay -1 and ``grokked``
    False.  (The latter was given ``grok_start`` = the first evaluation: a flat accuracy of 0 memorised at step
    1150 was tabulated as a jump 0-1150 of height 0.)"""
    s, tr, te = sub["step"], sub["train_accuracy"], sub["test_accuracy"]
    # running median over 5 evaluations: late loss spikes (slingshots) briefly collapse the test accuracy
    pad = np.pad(te, 2, mode="edge")
    te = np.median(np.stack([pad[i:i + len(te)] for i in range(5)]), axis=0)
    mem = int(s[np.argmax(tr >= 0.99)]) if np.any(tr >= 0.99) else -1
    hi = float(np.max(te))
    out = {"memorised": mem, "max_test_acc": hi, "final_test_acc": float(te[-1]),
           "grok_start": -1, "grok_mid": -1, "grok_end": -1, "grokked": False}
    after = np.nonzero((te >= 0.9 * hi) & (s >= mem))[0]
    if mem < 0 or after.size == 0:
        # (no jump after memorisation: the test accuracy peaked before it and stayed below 0.9 x that peak since,
        # which failed in a bare IndexError after the whole run had trained)
        return out
    ie = int(after[0])
    if ie > 0 and s[ie - 1] < mem and te[ie - 1] >= 0.9 * hi:
        # within 0.9 x the maximum already before memorisation: it generalised first, and the rise ended before
        # memorisation (grok_end was the memorisation step: a rise over steps 0-500, memorised at 1000, was
        # tabulated as a jump 350-1000)
        return out
    below = np.nonzero((te <= te[ie] - 0.25) & (np.arange(len(s)) < ie))[0]
    if below.size == 0:
        return out  # no rise of 0.25 to grok_end: no jump
    i0 = int(below[-1])
    mid = 0.5 * (te[i0] + te[ie])
    im = i0 + int(np.argmax(te[i0:ie + 1] >= mid))
    out.update(grok_start=int(s[i0]), grok_mid=int(s[im]), grok_end=int(s[ie]),
               test_acc_before_jump=float(te[i0]))
    out["grokked"] = bool(hi > 0.8 and out["grok_start"] - mem >= 500)
    return out


def placement(events, gt, window):
    """Each transition event placed against the test-accuracy jump: lead (negative) / lag in steps from
    ``grok_mid``; events within ``window`` steps of ``[grok_start, grok_end]`` count as detections, others as
    unmatched (not necessarily false: e.g. the memorisation transition, matched within ``window`` steps of the
    memorisation step of a run that memorised)."""
    rows = []
    for e in events:
        if e.kind != "transition":
            continue
        near = gt["grokked"] and gt["grok_start"] - window <= e.step <= gt["grok_end"] + window
        # (a run that never memorised has memorised = -1: an event within window of step -1 matched it)
        near_mem = gt["memorised"] >= 0 and abs(e.step - gt["memorised"]) <= window
        rows.append({"step": e.step, "onset": e.details["onset_step"], "observable": e.details["observable"],
                     "variant": e.variant, "direction": e.details["direction"],
                     "lag_vs_grok_mid": e.step - gt["grok_mid"] if gt["grokked"] else None,
                     "matches": "grokking" if near else ("memorisation" if near_mem else "unmatched")})
    return rows


def figure(out, path):
    plt = C.plt()
    sub = out["sub"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(sub["step"], sub["train_accuracy"], label="train acc")
    axes[0].plot(sub["step"], sub["test_accuracy"], label="test acc")
    axes[1].semilogy(out["traj"]["loss"], lw=0.5, label="train loss")
    axes[1].semilogy(sub["step"], sub["test_loss"], label="test loss")
    axes[1].semilogy(sub["step"], sub["grad_norm_canonical"], label="|grad| canonical")
    for k in sub:
        if k.startswith("invariant_norms/"):
            axes[2].plot(sub["step"], sub[k] / sub[k][0], label=k.split("/", 1)[1])
    axes[2].set(title="invariant norms / initial", xlabel="step")
    ev = [e for e in out["events"] if e.kind == "transition" and e.variant == "quotient"]
    for a in axes:
        C.mark_events(a, ev)
        a.legend(fontsize=7)
    axes[0].set(title="accuracy; dashed: transition events (quotient)", xlabel="step")
    axes[1].set(title="losses", xlabel="step")
    C.save_figure(fig, path)


def main(argv=None):
    cfg = C.load_config("grokking", argv, results=True)
    out = run(cfg)
    gt = ground_truth(out["sub"])
    rows = placement(out["events"], gt, window=5 * cfg.eval_every)
    d = C.save("grokking", out["traj"], out["events"], rows, {"ground_truth": gt, "wall_s": out["wall"]},
               files={"grokking.png": lambda p: figure(out, p)})
    print(gt)
    print(C.markdown_table(rows))
    print("written to", d)


if __name__ == "__main__":
    main()
