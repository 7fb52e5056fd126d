"""Plots, events and ``summary.md`` of a run directory (``quotient-sgd report runs/NAME`` regenerates them)."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading

import numpy as np

from .._durable import durable_write
from .._interrupt import interrupt_in
from ..config import Settings, from_dict
from ._rundir import (
    directory_path,
    load_trajectory,
    read_divergence,
    read_metrics,
    read_record_json,
    read_run_record,
    write_json,
)

PLOTS = ("loss", "observables", "charges", "shock_fold", "hessian", "events")
#: What a finished run recorded about itself (wall time, resume step, divergence): ``report`` keeps it.
RECORD = "run.json"


_PLT_LOCK = threading.Lock()


def _plt():
    """matplotlib's pyplot, imported (once) with the Agg backend.  An interrupt during the import is raised as
    the ``KeyboardInterrupt`` it is (:func:`interrupt_in`), not as the ``ImportError`` an extension module made
    of it."""
    with _PLT_LOCK:  # one import at a time (prefetch_plotting's thread and the report)
        try:
            import matplotlib

            matplotlib.use("Agg", force=True)
            import matplotlib.pyplot as plt
        except Exception as e:
            interrupt = interrupt_in(e)
            if interrupt is None:
                raise
            raise interrupt from None

    return plt


def _prefetch() -> None:
    try:
        _plt()
    except BaseException:  # noqa: BLE001  (a prefetch: the plots import again in the caller's thread, and report
        pass            # what fails there; from this thread a failure printed a traceback past the command's end)


def prefetch_plotting() -> None:
    """Import matplotlib's pyplot (~0.9 s) on a background thread: started before a run's first compilation,
    which releases the GIL, the import overlaps it and the report at the end finds the module loaded.  A failure
    of that import is silent (nothing is printed from the thread): the plots import pyplot again in the calling
    thread, which raises what fails."""
    threading.Thread(target=_prefetch, daemon=True, name="quotient_sgd-import-pyplot").start()


def _series(traj: dict, prefix: str) -> dict[str, np.ndarray]:
    """Per-step scalar series of the keys under ``prefix/`` (vectors per step reduced to their norm)."""
    out = {}
    for k, v in traj.items():
        if k == prefix or k.startswith(prefix + "/"):
            v = np.asarray(v, np.float64)
            out[k] = v if v.ndim == 1 else np.linalg.norm(v.reshape(len(v), -1), axis=1)
    return out


def _placeholder(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def marked(v) -> dict:
    """Keyword arguments of ``ax.plot`` that mark the finite entries of ``v`` with no finite neighbour: a line
    draws nothing through such a point, so a one-step run, a Hessian measured once (``observables.hessian_every``
    at least the run's steps) or a value between non-finite ones left an empty plot under its legend.  ``{}`` when
    every finite entry has a finite neighbour (the line shows them all)."""
    f = np.isfinite(np.asarray(v, np.float64))
    alone = f & ~np.r_[False, f[:-1]] & ~np.r_[f[1:], False]
    return {"marker": "o", "ms": 3, "markevery": alone} if alone.any() else {}


def _plot_lines(ax, steps, series: dict, title: str, logy: bool = False, empty: str = "not recorded"):
    drawn = False
    for k, v in series.items():
        if np.isfinite(v).any():
            ax.plot(steps[: len(v)], v, label=k, lw=1, **marked(v))
            drawn = True
    if not drawn:
        # a series recorded with no finite value (a run diverged at step 0) is not one that was never recorded
        held = [f"{k} ({len(v)} step{'s' if len(v) != 1 else ''})" for k, v in series.items() if len(v)]
        _placeholder(ax, f"{title}: " + (f"no finite value recorded in {', '.join(held)}" if held else empty))
        return
    if logy and all((v[np.isfinite(v)] > 0).all() for v in series.values()):
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step")
    ax.legend(fontsize=6)


def make_plots(workdir: str, traj: dict, metrics: list[dict], events: list[dict]) -> list[str]:
    """Write ``plots/<name>.png`` for every name in :data:`PLOTS`; returns the paths."""
    plt = _plt()
    pdir = os.path.join(workdir, "plots")
    os.makedirs(pdir, exist_ok=True)
    steps = np.asarray(traj.get("step", np.arange(len(traj.get("loss", [])))))
    paths = []

    def save(fig, name):
        p = os.path.join(pdir, f"{name}.png")
        # fixed margins in inches (labels and titles have fixed sizes): tight_layout, which measures every tick
        # label, was a third of a report's time (0.3 of 0.85 s; a sweep pays it per member)
        w, h = fig.get_size_inches()
        right = 0.2
        if len(fig.axes) > 1 and name in ("loss", "hessian"):
            # a twin axis on the right (the loss plot's accuracy, the Hessian plot's P^-1 H) is measured too: the
            # fixed 0.7 in was the loss plot's alone, and the Hessian plot's 0.2 in cut Adam's preconditioned
            # sharpness labels "2000", "1500" to "20", "15"
            twin = fig.axes[1].yaxis.get_tightbbox(fig.canvas.get_renderer())
            right = max(0.7, twin.width / fig.dpi + 0.1) if twin is not None else 0.7
        # the left axis's tick labels are measured (its y axis alone, 0.01-0.1 s): a log axis spanning less than a
        # decade labels its minor ticks "2.55x10^-1", which the fixed 0.75 in cut to ".55x10^-1", and a linear one
        # of small or large negative values "-0.000275" (a charge drift, a lambda_min) to "000275"
        box = fig.axes[0].yaxis.get_tightbbox(fig.canvas.get_renderer())
        left = max(0.75, box.width / fig.dpi + 0.1) if box is not None else 0.75
        fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=0.55 / h, top=1 - 0.35 / h, wspace=0.3)
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)

    # loss: train (per step) and the evaluations at chunk ends
    fig, ax = plt.subplots(figsize=(6, 4))
    series = {"train loss (batch)": np.asarray(traj.get("loss", []), np.float64)}
    _plot_lines(ax, steps, series, "loss", logy=True)
    ev = [r for r in metrics if "test_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["test_loss"] for r in ev], "o-", ms=3, label="test loss")
        ax.plot([r["step"] for r in ev], [r["train_loss"] for r in ev], "s--", ms=3, label="train loss (full)")
        if "test_accuracy" in ev[0]:
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in ev], [r["test_accuracy"] for r in ev], "g:", label="test accuracy",
                     **marked([r["test_accuracy"] for r in ev]))
            ax2.set_ylabel("accuracy")
            ax2.set_ylim(0, 1)
            # one legend for both axes, on the twin (drawn above the loss axis): the accuracy curve had no entry
            (h, lab), (h2, lab2) = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
            ax2.legend(h + h2, lab + lab2, fontsize=6)
        else:
            ax.legend(fontsize=6)
    save(fig, "loss")

    # quotient vs raw observables
    fig, axs = plt.subplots(1, 3, figsize=(12, 3.6))
    _plot_lines(axs[0], steps, {k: np.asarray(traj[k], np.float64) for k in ("grad_norm", "grad_norm_canonical")
                                if k in traj}, "gradient norm: raw vs canonical (quotient)", logy=True)
    _plot_lines(axs[1], steps, {k: np.asarray(traj[k], np.float64) for k in
                                ("update_horizontal_norm", "update_vertical_norm") if k in traj},
                "update: horizontal vs vertical", logy=True)
    _plot_lines(axs[2], steps, _series(traj, "effective_lr"),
                "effective learning rate on the quotient\n(norm over a component's entries)")
    save(fig, "observables")

    # charges and their drift (observed vs predicted)
    fig, axs = plt.subplots(1, 2, figsize=(10, 3.6))
    _plot_lines(axs[0], steps, _series(traj, "charges"), "Noether charges |Q| per component")
    drift = _series(traj, "charge_drift")
    pred = _series(traj, "charge_drift_predicted")
    drift = {k: v for k, v in drift.items() if not k.startswith("charge_drift_predicted")}
    _plot_lines(axs[1], steps, {**drift, **{k: v for k, v in pred.items() if np.isfinite(v).any()}},
                "charge drift per step: observed vs predicted")
    save(fig, "charges")

    # shock and fold numbers
    fig, ax = plt.subplots(figsize=(6, 4))
    _plot_lines(ax, steps, {k: np.asarray(traj[k], np.float64) for k in
                            ("shock_number", "fold_number", "shock_number_hessian", "fold_number_hessian")
                            if k in traj}, "shock and fold numbers (fold at 1, unstable at 2)")
    if any(k in traj for k in ("fold_number", "fold_number_hessian")):
        ax.axhline(1.0, color="k", lw=0.5, ls="--")
        ax.axhline(2.0, color="r", lw=0.5, ls="--")
    save(fig, "shock_fold")

    # Hessian extremes (sampled where fresh)
    fig, ax = plt.subplots(figsize=(6, 4))
    hk = _hessian_keys(traj)
    pk = sorted(k for k in hk if k.endswith("_preconditioned"))  # Adam's P^-1 H: its own scale, right axis
    hk = [k for k in hk if k not in pk]
    if hk and "hessian_step" in traj:
        hs = np.asarray(traj["hessian_step"])
        fresh = np.r_[True, hs[1:] != hs[:-1]] & (hs >= 0)
        _plot_lines(ax, steps[fresh], {k: np.asarray(traj[k], np.float64)[fresh] for k in sorted(hk)},
                    "Hessian extremes: quotient / horizontal / raw" + (" (dotted, right: P^-1 H)" if pk else ""))
        if pk:
            ax2 = ax.twinx()
            for j, k in enumerate(pk):
                v = np.asarray(traj[k], np.float64)[fresh]
                ax2.plot(steps[fresh], v, ls=":", lw=1, color=f"C{len(hk) + j}", label=k, **marked(v))
            ax2.legend(fontsize=6, loc="lower right")
    else:
        _placeholder(ax, "Hessian extremes not recorded\n(set observables.hessian_every > 0)")
    save(fig, "hessian")

    # events on the loss curve
    fig, ax = plt.subplots(figsize=(6, 4))
    _plot_lines(ax, steps, {"loss": np.asarray(traj.get("loss", []), np.float64)}, "detected events", logy=True)
    colors = {}
    for e in events:
        c = colors.setdefault(e["kind"], f"C{len(colors) + 1}")
        ax.axvline(e["step"], color=c, lw=0.8, alpha=0.7)
    for kind, c in colors.items():
        ax.plot([], [], color=c, label=kind)
    if not events:
        ax.text(0.02, 0.02, "no events detected", transform=ax.transAxes, fontsize=8)
    if ax.get_legend_handles_labels()[0]:  # (no loss curve and no event: a run reported before its first chunk)
        ax.legend(fontsize=6)
    save(fig, "events")
    return paths


def detect_events(s: Settings, traj: dict, diverged: dict | None) -> tuple[list[dict], str | None]:
    """Events of the diagnostics (:func:`quotient_sgd.diagnostics.detect`) plus the run's own divergence."""
    out: list[dict] = []
    err = None
    finite = {k: v for k, v in traj.items()}
    if diverged is not None and "loss" in finite:
        n = diverged["step"] - int(traj["step"][0]) if len(traj.get("step", [])) else 0
        finite = {k: v[:n] for k, v in finite.items()}
    # (a run of one recorded step too: detect_run reads it so, and its events, e.g. a step-0 edge of stability, were
    # missing from the events.json the run wrote)
    if len(finite.get("loss", [])) > 0:
        from ..diagnostics import ALL_KINDS, detect
        from ..diagnostics._live import _options_from_config

        # the run's settings (horizon, spike smoothing of a mini-batch loss, momentum), the ones detect_run
        # re-detects a run directory with
        opts = _options_from_config(s.to_dict())
        try:
            out = [e.to_dict() for e in detect(finite, lr=s.optim.lr, **opts)]
        except Exception:  # a diagnostic failing must not lose the run's outputs, nor the other detectors' events
            errs = []
            for kind in ALL_KINDS:
                try:
                    out += [e.to_dict() for e in detect(finite, lr=s.optim.lr, kinds=[kind], **opts)]
                except Exception as e:
                    errs.append(f"{kind}: {type(e).__name__}: {e}")
            err = "; ".join(errs) or None
    if diverged is not None:
        out.append({"step": int(diverged["step"]), "kind": "divergence", "strength": "inf",
                    "observables": {}, "variant": "quotient", "invariant": True,
                    "details": {"reason": diverged["reason"], "ended_run": True,
                                **({"inferred": True} if diverged.get("inferred") else {})}})
    return sorted(out, key=lambda e: e["step"]), err


def last_evaluation_text(last: dict, n: int, total: int, diverged: dict | None) -> str:
    """What the evaluation row ``last`` (the last metric row with ``test_loss``) is, for a run of ``n`` recorded
    steps out of ``total``: ``"final (step k)"`` when it evaluates the last step of a finished run, else which
    step it evaluates.  A diverged run's last evaluation is the one of the chunk before the divergence (the chunk
    that diverged is not evaluated), an unfinished run's the one of its last finished chunk."""
    step = int(last["step"])
    if diverged is not None:
        return f"last evaluation (step {step}, before the divergence at step {diverged['step']})"
    if step < n - 1 or n < total:
        return f"last evaluation (step {step}; {n} of {total} step{'s' if total != 1 else ''} recorded)"
    return f"final (step {step})"


def _hessian_keys(traj: dict) -> list[str]:
    """The trajectory's Hessian extremes (``sharpness_*``, ``lambda_min_*``), as ``plots/hessian.png`` draws them."""
    return sorted(k for k in traj if k.startswith("sharpness_") or k.startswith("lambda_min_"))


def unrecorded(s: Settings, traj: dict, metrics: list[dict], diverged: dict | None) -> list[tuple[str, str]]:
    """``[(what, why)]``: the series the plots draw (and the evaluation the summary reports) that the run holds no
    finite value of, with the reason where the config or the run's end gives it: a run that diverged before its
    first chunk end has no evaluation, ``observables.hessian_every = 0`` no Hessian extremes, a series recorded
    only while the loss was non-finite no finite value.  The plots show these panels as placeholders; the
    summary names them (it said nothing of them: a diverged run's summary read as if the run had never been
    evaluated by mistake)."""
    out: list[tuple[str, str]] = []
    n = len(traj.get("loss", []))
    if not any("test_loss" in r for r in metrics):
        if diverged is not None:
            why = (f"the run diverged at step {diverged['step']}, before its first evaluation (at the end of its "
                   f"first chunk of checkpoint.every = {s.checkpoint.every} steps)")
        elif n < s.steps:
            why = f"no chunk of checkpoint.every = {s.checkpoint.every} steps has finished ({n} of {s.steps} recorded)"
        else:
            why = "metrics.jsonl holds no evaluation row"
        out.append(("evaluation (train / test loss, accuracy)", why))
    if n == 0:
        return out + [("per-step observables", "no step recorded")]

    def finite(v) -> bool:
        return bool(np.isfinite(np.asarray(v, np.float64)).any())

    hk = _hessian_keys(traj)
    if not hk:
        why = ("observables.hessian_every = 0" if s.observables.hessian_every == 0 else "not in the trajectory")
        out.append(("Hessian extremes (plots/hessian.png)", why))
    elif not any(finite(traj[k]) for k in hk):
        out.append(("Hessian extremes (plots/hessian.png)", "no finite value"))
    panels = (
        ("training loss (plots/loss.png)", {"loss": traj["loss"]} if "loss" in traj else {}),
        ("gradient norms (plots/observables.png)",
         {k: traj[k] for k in ("grad_norm", "grad_norm_canonical") if k in traj}),
        ("horizontal / vertical update norms (plots/observables.png)",
         {k: traj[k] for k in ("update_horizontal_norm", "update_vertical_norm") if k in traj}),
        ("effective learning rate (plots/observables.png)", _series(traj, "effective_lr")),
        ("Noether charges (plots/charges.png)", _series(traj, "charges")),
        ("charge drift (plots/charges.png)", _series(traj, "charge_drift")),
        ("shock and fold numbers (plots/shock_fold.png)",
         {k: traj[k] for k in ("shock_number", "fold_number", "shock_number_hessian", "fold_number_hessian")
          if k in traj}),
    )
    for what, series in panels:
        if not series:
            out.append((what, "not in the trajectory"))
        elif not any(finite(v) for v in series.values()):
            out.append((what, f"no finite value in {n} recorded step{'s' if n != 1 else ''}"))
    return out


def _optimiser_text(o) -> str:
    """``name lr=... key=...`` with the keys this optimiser reads (Adam's summary has no momentum), plus the global
    gradient clipping when it is on."""
    from ..config._validate import _READ_BY

    keys = ["lr"] + [k for k, readers in _READ_BY["optim"].items() if o.name in readers]
    text = " ".join([o.name] + [f"{k}={getattr(o, k)}" for k in keys])
    return text + (f" clip_norm={o.clip_norm}" if o.clip_norm else "")


def _symmetry_text(s: Settings) -> str:
    """The summary's symmetry: ``off``, ``none (...)`` for a model that declares no symmetry (an MLP with
    ``model.hidden=()``: ``symmetry.components = ('all',)`` selects nothing, and the run has no group; it read
    "all (mode observe)"), else the selected components and the mode."""
    from ..config._build_check import selected_components

    if not s.symmetry.enabled:
        return f"off (mode {s.symmetry.mode})"
    if not selected_components(s):
        return f"none (this {s.model.name} declares no symmetry, so the run has no group)"
    return f"{', '.join(s.symmetry.components)} (mode {s.symmetry.mode})"


def write_summary(workdir: str, s: Settings, traj: dict, metrics: list[dict], events: list[dict], *,
                  diverged: dict | None, wall_s: float | None, resumed_from: int | None, detect_error: str | None,
                  source: str | None = None) -> str:
    """Write ``summary.md``: what ran, its steps, wall time, divergence, last evaluation (with the step it
    evaluates), the detected events and the files.  ``source``: where the trajectory was read from, stated when
    it is not ``trajectory.npz`` (the parts of an unfinished run)."""
    ev = [r for r in metrics if "test_loss" in r]
    last = ev[-1] if ev else {}
    n = len(traj.get("loss", []))
    lines = [f"# Run `{s.name}`", ""]
    lines += [f"- model: {s.model.name} ({s.model.activation}), data: {s.data.name}, optimiser: "
              f"{_optimiser_text(s.optim)}, batch size {s.data.batch_size or 'full'}",
              f"- steps: {n} of {s.steps}" + (f", resumed from step {resumed_from}" if resumed_from else ""),
              f"- symmetry: {_symmetry_text(s)}, init_gauge={s.init_gauge}, seed={s.seed}"]
    if source and source != "trajectory.npz":
        lines.append(f"- trajectory read from {source}")
    if wall_s is not None:
        lines.append(f"- wall time: {wall_s:.1f} s")
    if diverged is not None:
        # (an inferred divergence has another ending: read_record must not take it for one the run recorded)
        lines.append(f"- **diverged at step {diverged['step']}: {diverged['reason']}** "
                     + ("(running the command again records it)"
                        if diverged.get("inferred") else "(run ended cleanly)"))
    if last:
        res = ", ".join(f"{k}={last[k]:.4g}" for k in ("train_loss", "test_loss", "train_accuracy", "test_accuracy")
                        if k in last)
        lines.append(f"- {last_evaluation_text(last, n, s.steps, diverged)}: {res}")
    missing = unrecorded(s, traj, metrics, diverged)
    if missing:
        lines += ["", "## Not recorded", ""] + [f"- {what}: {why}" for what, why in missing]
    lines += ["", "## Detected events", ""]
    if detect_error:
        lines.append(f"Detection failed: {detect_error}")
    if events:
        # the level a crossing event crossed (a fold of a momentum run crosses fold_edge and the edge at one step,
        # with one strength: without it the two rows read as one event listed twice)
        lines += ["| step | kind | variant | level | strength |", "|---:|---|---|---:|---:|"]
        for e in events[:40]:
            level = (e.get("details") or {}).get("level")
            level = f"{level:g}" if isinstance(level, (int, float)) and not isinstance(level, bool) else ""
            lines.append(f"| {e['step']} | {e['kind']} | {e.get('variant', '')} | {level} | {e.get('strength', '')} |")
        if len(events) > 40:
            lines.append(f"| ... | {len(events) - 40} more in events.json | | | |")
    else:
        lines.append("None.")
    lines += ["", "## Files", "", ", ".join(_files(workdir)), ""]
    text = "\n".join(lines)
    with durable_write(os.path.join(workdir, "summary.md")) as f:
        f.write(text)
    return text


def _files(workdir: str) -> list[str]:
    """The run directory's outputs that exist (an interrupted run has no trajectory.npz yet; plots can be off),
    summary.md included (being written)."""
    names = ["config.json", "trajectory.npz", "metrics.jsonl", "events.json", RECORD, "summary.md", "checkpoints/",
             "trajectory_parts/", "tensorboard/"] + [f"plots/{p}.png" for p in PLOTS]
    return [n for n in names if n == "summary.md" or os.path.exists(os.path.join(workdir, n.rstrip("/")))]


def read_record(workdir: str) -> dict | None:
    """``{"wall_s", "resumed_from", "diverged"}`` as the run recorded them (``run.json``; for a directory written
    before that file existed, the lines of its ``summary.md``), or ``None``."""
    path = os.path.join(workdir, RECORD)
    if os.path.exists(path):
        return read_run_record(path, "run directory")
    path = os.path.join(workdir, "summary.md")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:  # (as durable_write writes it)
        text = f.read()
    wall = re.search(r"^- wall time: ([0-9.eE+-]+) s$", text, re.M)
    resumed = re.search(r"^- steps: .*, resumed from step (\d+)$", text, re.M)
    div = re.search(r"^- \*\*diverged at step (\d+): (.*)\*\* \(run ended cleanly\)$", text, re.M)
    return {"wall_s": float(wall.group(1)) if wall else None,
            "resumed_from": int(resumed.group(1)) if resumed else None,
            "diverged": {"step": int(div.group(1)), "reason": div.group(2)} if div else None}


def finalize(workdir: str, s: Settings, traj: dict, *, diverged: dict | None, wall_s: float | None,
             resumed_from: int | None, computed: bool = True) -> list[dict]:
    """events.json, plots, summary.md and run.json (the wall time, resume step and divergence, which ``report``
    keeps) of a finished (or diverged) run.  ``computed``: whether the call computed steps; without
    ``logging.plots`` its ``plots/`` then goes (the call removed the plots it found when it started, so these are a
    ``report`` drawn while it computed: they describe fewer steps than the summary; a call that computed nothing
    keeps the plots it found)."""
    from ._rundir import outputs_lock

    with outputs_lock(workdir):  # (a `report` drawing the unfinished run meanwhile writes before, never after)
        write_json(os.path.join(workdir, RECORD), {"wall_s": wall_s, "resumed_from": resumed_from,
                                                   "diverged": diverged})
        metrics = read_metrics(os.path.join(workdir, "metrics.jsonl"))
        events, err = detect_events(s, traj, diverged)
        write_json(os.path.join(workdir, "events.json"), events)
        if s.logging.plots:
            make_plots(workdir, traj, metrics, events)
        elif computed:
            shutil.rmtree(os.path.join(workdir, "plots"), ignore_errors=True)
        write_summary(workdir, s, traj, metrics, events, diverged=diverged, wall_s=wall_s,
                      resumed_from=resumed_from, detect_error=err)
    return events


def recorded_divergence(workdir: str, events: list[dict] | None = None) -> dict | None:
    """``{"step", "reason"}`` of the divergence that ended the run, as the runner recorded it: in ``run.json``
    (or, for an older directory, ``summary.md``), else the ``ended_run`` divergence event of ``events`` (read
    from ``events.json`` when ``None``; not one that ``report`` inferred, see :func:`inferred_divergence`), else
    a sweep member's ``diverged.json`` (a sweep not finished yet); ``None`` when the run recorded no
    divergence."""
    div = (read_record(workdir) or {}).get("diverged")
    if div is not None:
        return div
    if events is None:
        events = read_events(workdir) or []
    div = next(({"step": e["step"], "reason": e["details"].get("reason", "")} for e in events
                if e.get("kind") == "divergence" and e.get("details", {}).get("ended_run")
                and not e["details"].get("inferred")), None)
    if div is None:
        div = read_divergence(workdir)
    return div


#: What the reason of a divergence read off the trajectory adds to the runner's reason.
INFERRED = "inferred from the trajectory: the run did not record it (it did not finish)"


def inferred_divergence(traj: dict) -> dict | None:
    """``{"step", "reason", "inferred": True}`` of the divergence a run's trajectory shows: its first recorded
    step whose loss is not finite (the runner's rule), the reason saying it was inferred (:data:`INFERRED`).
    ``None`` when every recorded loss is finite (a divergence by non-finite parameters alone leaves no mark in
    the trajectory and is not inferred), and when steps follow the first non-finite loss: the runner ends a
    run at that step (the last one it records), so such a trajectory was not ended by a divergence there.

    This is the state a run or sweep member killed after writing the trajectory part of the chunk that diverged,
    and before recording the divergence (``run.json``, ``events.json``, a member's ``diverged.json``), leaves;
    running the same command again recomputes that chunk and records it."""
    from ._run import first_divergence

    loss = np.asarray(traj.get("loss", ()))
    if loss.ndim != 1 or not len(loss):
        return None
    start = int(np.asarray(traj["step"])[0]) if len(traj.get("step", ())) else 0
    div = first_divergence(loss, True, start)
    if div is None or div["step"] != start + len(loss) - 1:
        return None
    return {**div, "reason": f"{div['reason']}; {INFERRED}", "inferred": True}


def run_divergence(workdir: str, traj: dict, events: list[dict] | None = None) -> dict | None:
    """The divergence that ended the run in ``workdir``: the one it recorded (:func:`recorded_divergence`),
    else the one its trajectory ``traj`` shows (:func:`inferred_divergence`: a run stopped before recording
    it); ``None`` when there is neither.  ``report``, the sweep table and
    :func:`~quotient_sgd.diagnostics.detect_run` read it here."""
    return recorded_divergence(workdir, events) or inferred_divergence(traj)


def load_run(workdir: str) -> tuple[Settings, dict, list[dict], list[dict]]:
    """``(settings, trajectory, metric rows, events)`` of a run directory; the trajectory is
    :func:`~._rundir.load_trajectory`'s (its ``source`` says whether it came from ``trajectory.npz`` or from the
    parts of an unfinished run), the events ``events.json``'s (none when it is missing)."""
    s = from_dict(read_record_json(os.path.join(workdir, "config.json"), "run directory"))
    traj = load_trajectory(workdir)
    return s, traj, read_metrics(os.path.join(workdir, "metrics.jsonl")), read_events(workdir) or []


def read_events(workdir: str) -> list[dict] | None:
    """The events of ``events.json`` in ``workdir``; ``None`` when there is none, or when it parses but is not a
    list of events (objects with an integer ``step``, a string ``kind`` and, when present, an object of
    ``details``, as the runner writes them: a hand-edited or foreign file), which is said in a ``RuntimeWarning``
    naming the file (``report`` then detects the events again and rewrites it; it failed in ``'NoneType' object is
    not iterable`` or ``'int' object has no attribute 'get'``, and an event at step ``"x"`` was drawn as a category
    of the plots' step axis, one at step ``null`` failed in a bare ``TypeError``)."""
    path = os.path.join(workdir, "events.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        events = json.load(f)

    def event(e) -> bool:
        return (isinstance(e, dict) and isinstance(e.get("step"), int) and not isinstance(e["step"], bool)
                and isinstance(e.get("kind"), str) and isinstance(e.get("details", {}), dict))

    if isinstance(events, list) and all(map(event, events)):
        return events
    import warnings

    warnings.warn(f"{path} holds {json.dumps(events)[:60]}, not a list of events (objects with an integer 'step' "
                  f"and a string 'kind', as the runner writes them); ignoring it: the events are detected again",
                  RuntimeWarning, stacklevel=2)
    return None


def report(workdir: str) -> str:
    """Regenerate ``plots/*.png`` and ``summary.md`` of a run directory (of a sweep directory: the sweep table
    and comparison plots; run ``report`` on ``members/<i>`` for a member); returns the summary text."""
    workdir = directory_path(workdir, "report")
    if os.path.exists(os.path.join(workdir, "sweep.json")):
        from ._sweep import report_sweep

        return report_sweep(workdir)
    bare = workdir.rstrip(os.sep) or workdir  # (a file given as "out.txt/" does not "exist": it is a file)
    if os.path.islink(bare) and not os.path.exists(bare):
        raise FileNotFoundError(f"{workdir!r} is a symbolic link to {os.readlink(bare)!r}, which does not exist; "
                                f"give a run directory (with config.json) or a sweep directory (with sweep.json)")
    if not os.path.lexists(bare):
        raise FileNotFoundError(f"{workdir!r} does not exist; give a run directory (with config.json) or a sweep "
                                f"directory (with sweep.json)")
    if not os.path.isdir(bare):
        raise FileNotFoundError(f"{workdir!r} is a file, not a run directory (with config.json) nor a sweep "
                                f"directory (with sweep.json)")
    if not os.path.exists(os.path.join(workdir, "config.json")):
        raise FileNotFoundError(f"{workdir!r} is not a run directory (no config.json) nor a sweep (no sweep.json)")
    from ._rundir import check_trajectory_loaded, outputs_lock

    with outputs_lock(workdir):  # (the run finishing meanwhile writes its outputs after this report's, not before)
        s, traj, metrics, events = load_run(workdir)
        check_trajectory_loaded(workdir, workdir, traj)
        record = read_record(workdir) or {}
        diverged = run_divergence(workdir, traj, events)
        if not events and traj:
            events, _ = detect_events(s, traj, diverged)
            write_json(os.path.join(workdir, "events.json"), events)
        make_plots(workdir, traj, metrics, events)
        return write_summary(workdir, s, traj, metrics, events, diverged=diverged, wall_s=record.get("wall_s"),
                             resumed_from=record.get("resumed_from"), detect_error=None,
                             source=getattr(traj, "source", None))
