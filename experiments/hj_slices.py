"""Experiment 5: shocks of the coarse-grained loss on slices of a trained network (THEORY section 3).

The ReLU MLP of experiment 1 is trained by full-batch GD; at a few checkpoints the horizontal Hessian at the
canonical representative gives its most negative eigenvalue ``lambda_min`` and eigenvector ``d`` (a function
direction: orbit invariant).  The loss on the slice ``a -> L(c(theta) + a d)`` is coarse-grained by the viscous
HJ flow (:func:`quotient_sgd.hj.slice_flow`).  Compared: the inviscid shock time of the slice,
``-1 / min_a L''(a)``, against the quotient-Hessian prediction ``1 / max(0, -lambda_min)`` (equal in the limit of a
small slice: ``L''(0) = lambda_min``); and whether the flow run past the predicted time has formed a shock.  The
slice shocks are turned into ``shock`` events (variant ``slice``) by :func:`quotient_sgd.diagnostics.detect`.

    python experiments/hj_slices.py [scale=paper] [model='["hidden=[8]"]']

``model`` holds ``key=value`` overrides of experiment 1's config (the MLP and its data); ``scale=test`` is a
smoke-test size (a smaller MLP, one slice per checkpoint), not the experiment.
"""

from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import _common as C  # noqa: E402
import edge_of_stability as exp1  # noqa: E402
from quotient_sgd import hj  # noqa: E402
from quotient_sgd import observables as obs  # noqa: E402
from quotient_sgd.diagnostics import detect  # noqa: E402
from quotient_sgd.optim import train  # noqa: E402


#: Keys of experiment 1's config that the slices do not read, with the key of this experiment that sets what
#: they would: ``model=["seed=3"]`` ran seed 0 (``seed`` of this config replaced it) and ``num_steps``,
#: ``hessian_every``, ``twin_scale`` changed nothing, while ``result.json`` recorded them as given.
UNREAD_MODEL_KEYS = {
    "seed": "seed=... of this experiment (it seeds the MLP, its data and the slices)",
    "num_steps": "checkpoints=[...] (the GD steps trained to)",
    "hessian_every": "nothing here (the Hessian is taken at each checkpoint)",
    "twin_scale": "nothing here (experiment 5 has no re-gauged twin)",
    "scale": "scale=... of this experiment (it sizes the MLP too)",
}


def model_config(cfg):
    """Experiment 1's config at this experiment's scale (``cfg.scale``) with the ``key=value`` overrides of
    ``cfg.model`` applied and ``seed`` set to ``cfg.seed``.  (``scale=paper`` sliced the CPU-sized MLP, 8-32-32-1 on
    128 examples, experiment 1's paper sizes being reachable only through ``model=["scale=paper"]``.)  An override
    that is not ``key=value``, a key experiment 1 does not have, a value out of its range
    and a key the slices do not read (:data:`UNREAD_MODEL_KEYS`) stop the script (``SystemExit``) naming
    ``model``, the override and what is allowed, before anything is computed."""
    def refuse(what):
        raise SystemExit(f"hj_slices: model={list(cfg.model)!r}: {what}")

    for item in cfg.model:
        # (a number, model=[1] at the CPU scale, whose default () gives no element type, failed in a bare
        # "TypeError: argument of type 'int' is not iterable")
        if not isinstance(item, str) or "=" not in item:
            refuse(f"{item!r} is not a key=value override of configs/edge_of_stability.py (e.g. 'hidden=[8]')")
        key = item.split("=", 1)[0].lstrip("-").replace("config.", "")
        if key in UNREAD_MODEL_KEYS:
            refuse(f"{item!r}: experiment 5 does not read experiment 1's {key}; set {UNREAD_MODEL_KEYS[key]}")
    try:
        ecfg = C.load_config("edge_of_stability", [f"scale={cfg.scale}", *cfg.model])
    except SystemExit as err:
        refuse(str(err.code))
    ecfg.seed = cfg.seed
    return ecfg


def run(cfg):
    ecfg = model_config(cfg)
    graphdef, params, _, group, batch = exp1.setup(ecfg)
    loss = functools.partial(C.mse, graphdef)
    full = functools.partial(C._bind_batch, loss, batch)
    lam = jax.jit(lambda p: obs.sharpness_quotient(full, group, p, key=jax.random.key(1),
                                                   num_matvecs=cfg.lanczos))
    ex0 = lam(params)
    # experiment 1's learning rate, by experiment 1's function: computed here by another path (an unjitted
    # sharpness_horizontal), lambda_step(theta_0) differed in its last float32 digits (10.2029705 against experiment
    # 1's 10.2029686), so the MLP was trained at another lr than experiment 1's
    lr, _ = exp1.learning_rate(ecfg, loss, params, group, batch)
    tx = optax.sgd(lr)
    data = functools.partial(C._const_batch, batch)
    rows, slice_shocks = [], []
    step, opt_state = 0, None
    for ck in cfg.checkpoints:
        if ck > step:
            params, opt_state, traj = train(loss, params, tx, data, num_steps=ck - step, opt_state=opt_state,
                                            start_step=step, donate=False)
            bad = np.nonzero(~np.isfinite(np.asarray(traj["loss"])))[0]
            if bad.size or not all(bool(np.all(np.isfinite(x))) for x in jax.tree.leaves(params)):
                # (the slice through non-finite parameters failed in hj.shock_time's traceback)
                at = f"at step {step + int(bad[0])}" if bad.size else f"by step {ck}"
                raise SystemExit(f"hj_slices: GD at lr = {ecfg.eta_lambda0} / lambda_step(theta_0) = {lr:.4g} "
                                 f"diverged {at} (non-finite loss or parameters), before checkpoint {ck}: no slice "
                                 f"through it; lower eta_lambda0 in model=[...] or end checkpoints=[...] before it")
            step = ck
        ex = lam(params)
        lmin = float(ex.bottom[0])
        d = jax.tree.map(lambda v: v[0], ex.bottom_vectors)
        pc = group.canonicalize(params)
        t_hess = float(hj.shock_time_from_hessian(lmin))
        for extent in cfg.extents:
            with jax.enable_x64(True):
                rows.append(_one_slice(cfg, loss, batch, pc, d, extent, ck, lmin, t_hess, lr, slice_shocks))
    events = detect({"loss": np.zeros(max(cfg.checkpoints) + 1)}, kinds=["shock"], slice_shocks=slice_shocks)
    return dict(rows=rows, events=events, lr=lr, lambda_min0=float(ex0.bottom[0]))


def _one_slice(cfg, loss, batch, pc, d, extent, ck, lmin, t_hess, lr, slice_shocks):
    """One slice, in float64: finite differences of a float32 loss on a fine slice are rounding noise."""
    f64 = lambda t: jax.tree.map(lambda x: jax.numpy.asarray(x, jax.numpy.float64), t)  # noqa: E731
    pc, d, batch = f64(pc), f64(d), f64(batch)
    full = functools.partial(C._bind_batch, loss, batch)
    # inviscid slice shock time from the sampled loss alone (no flow needed)
    grid = hj.Grid(cfg.n, -extent, extent, periodic=False)
    a = np.asarray(grid.x)
    # the slope L'(a) = <grad L(c + a d), d> by autodiff: exact at every point, the ends included.  np.gradient's
    # first-order end values (off by L'' dx / 2) were read by shock_time's one-sided end stencils: where min L'' is
    # at an end of the slice, t* came out 10% long (L = -a^3 + 0.3 a^2 on [-0.5, 0.5], 41 points), or finite (20)
    # for a slice whose L'' >= 0 everywhere (the same loss on [-0.1, 0.1])
    p0 = jax.vmap(jax.grad(lambda s: full(jax.tree.map(lambda c, v: c + s * v, pc, d))))(grid.x)
    l2 = np.gradient(np.asarray(p0), a)
    # L''(0): the centred difference of the slope about a = 0.  An odd n has a grid point at 0 (np.gradient's
    # value there); an even n has none: a[n // 2] = dx / 2, and np.gradient's value there, centred at dx / 2, was
    # reported as L''(0) (0.90 for L'' = 1.5 - 6 a at n = 6 on [-0.5, 0.5]; 1.42 at n = 40): the two points
    # beside 0, at -dx / 2 and dx / 2, give it centred
    m = len(a) // 2
    l2_0 = float(l2[m]) if len(a) % 2 else float((p0[m] - p0[m - 1]) / (a[m] - a[m - 1]))
    t_slice = float(hj.shock_time(p0, grid))
    # the viscous flow past the predicted time; nu scaled to the slice so that the viscous length sqrt(nu t) is
    # nu_rel^(1/2) x extent
    t1 = cfg.flow_time_factor * t_hess if np.isfinite(t_hess) else 1.0
    nu = cfg.nu_rel * extent ** 2 / t1
    try:
        sf = hj.slice_flow(full, pc, d, extent=extent, n=cfg.n, eta=t1, k=1, nu=nu, scheme="fv",
                           max_steps=cfg.max_steps)
        shocks = sf.shocks.to_list()
        flow = {"shocks at t": len(shocks), "steepest shock jump": float(shocks[0]["jump"]) if shocks else 0.0,
                "boundary_ok": bool(sf.boundary_ok)}
    except Exception as err:  # noqa: BLE001  (a stiff flow is reported, not hidden)
        shocks = []
        flow = {"shocks at t": f"flow failed: {type(err).__name__}"}
    row = {
        "step": ck, "extent": extent, "lambda_min (quotient)": lmin, "t* Hessian": t_hess,
        "t* slice": t_slice, "ratio slice/Hessian": t_slice / t_hess,
        "L''(0) on slice": l2_0, "min L'' on slice": float(np.min(l2[2:-2])),
        "flow t": t1, "nu": nu, **flow, "shock number lr*|lambda_min|": lr * max(0.0, -lmin),
    }
    if shocks:
        slice_shocks.append({"step": ck, "shock_time": t_slice, "lr": lr, "extent": extent,
                             "jump": float(shocks[0]["jump"])})
    return row


def figure(out, path):
    plt = C.plt()
    rows = out["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for extent in sorted({r["extent"] for r in rows}):
        rs = [r for r in rows if r["extent"] == extent]
        ax.plot([r["step"] for r in rs], [r["ratio slice/Hessian"] for r in rs], "o-", label=f"extent {extent}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set(xlabel="GD step of the checkpoint", ylabel="t* slice / t* Hessian",
           title="slice shock time vs quotient-Hessian prediction")
    ax.legend()
    C.save_figure(fig, path)


def main(argv=None):
    cfg = C.load_config("hj_slices", argv, results=True)
    model_config(cfg)  # its overrides checked before anything is computed
    out = run(cfg)
    d = C.save("hj_slices", {"step": np.asarray([r["step"] for r in out["rows"]])}, out["events"], out["rows"],
               {"lr": out["lr"]}, files={"hj_slices.png": lambda p: figure(out, p)})
    print(C.markdown_table(out["rows"]))
    print("written to", d)


if __name__ == "__main__":
    main()
