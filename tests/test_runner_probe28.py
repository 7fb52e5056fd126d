"""Run and sweep directories placed inside the directories that another run or sweep manages are refused."""

import json
import os

import pytest

from quotient_sgd.cli import main
from quotient_sgd.runner import RunDirError, run, sweep
from quotient_sgd.runner._rundir import check_workdir
from tests.helpers import tiny_settings


def _fake_run(path, s):
    """A run directory as a run leaves it: its config.json and a plots/ directory with a plot."""
    os.makedirs(os.path.join(path, "plots"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(s.to_dict(), f)
    with open(os.path.join(path, "plots", "loss.png"), "wb") as f:
        f.write(b"png")


def test_workdir_inside_a_runs_managed_directories_is_refused(tmp_path):
    # `quotient-sgd run --workdir=r1/plots/x` trained a run there, and the next `quotient-sgd run` of r1 (the same
    # command again: finalize removes and redraws plots/) deleted it without a word; checkpoints/ and
    # trajectory_parts/ are pruned on resume, a sweep's members/ written by the sweep
    s = tiny_settings(steps=2)
    r1 = str(tmp_path / "r1")
    _fake_run(r1, s)
    for sub in ("plots/x", "checkpoints/x", "trajectory_parts/x", "tensorboard", "plots"):
        wd = os.path.join(r1, sub)
        with pytest.raises(RunDirError, match=r"is in .*the (\w+)/ directory of the run .*r1"):
            run(s, wd)
        with pytest.raises(RunDirError, match="sweep directory .* directory of the run"):
            sweep(s, os.path.join(wd, "sweep"))
        assert not os.path.exists(os.path.join(r1, sub, "config.json"))
    assert sorted(os.listdir(os.path.join(r1, "plots"))) == ["loss.png"]
    # through a symbolic link too
    os.symlink(os.path.join(r1, "plots"), str(tmp_path / "lnk"))
    with pytest.raises(RunDirError, match="plots/ directory of the run"):
        check_workdir(str(tmp_path / "lnk" / "y"), s)
    # a sweep's member directory, and deeper inside it
    sw = tmp_path / "sw"
    os.makedirs(sw / "members" / "000")
    (sw / "sweep.json").write_text(json.dumps({"config": s.to_dict(), "members": [{}]}))
    with pytest.raises(RunDirError, match="members/ directory of the sweep"):
        check_workdir(str(sw / "members" / "000" / "plots" / "z"), s)
    # a directory of another name beside the run's files, and a directory named plots/ of no run, are accepted
    assert check_workdir(os.path.join(r1, "inner"), s) is False
    assert check_workdir(str(tmp_path / "plots" / "x"), s) is False
    other = tmp_path / "project"  # (a config.json of another program is no run)
    os.makedirs(other / "plots")
    (other / "config.json").write_text('{"theme": "dark"}')
    assert check_workdir(str(other / "plots" / "x"), s) is False
    # the command says it, with status 2
    assert main(["quotient-sgd", "run", f"--workdir={os.path.join(r1, 'plots', 'x')}", "--config.steps=2"]) == 2
    assert not os.path.exists(os.path.join(r1, "plots", "x"))


def test_plot_tick_labels_lie_inside_the_figure(tmp_path, monkeypatch):
    # the Hessian plot of an Adam run draws P^-1 H on a twin axis at the right, with 0.2 in of margin: its labels
    # "2000", "1500" were cut to "20", "15"; a linear left axis of small negative values (a lambda_min, a charge)
    # had its labels "-0.000275" cut to "000275" by the fixed 0.75 in
    import numpy as np

    from quotient_sgd.runner import _report

    plt = _report._plt()
    figures = []

    class Keep:  # pyplot, with the figures kept open for measuring once they are saved
        def __getattr__(self, name):
            return getattr(plt, name)

        def close(self, fig):
            figures.append(fig)

    monkeypatch.setattr(_report, "_plt", lambda: Keep())
    n = 12
    steps = np.arange(n)
    wiggle = np.sin(steps)
    traj = {"step": steps, "loss": np.exp(-steps / 5.0), "grad_norm": 1.0 + 0.1 * wiggle,
            "charges/0": -2.6e-4 + 1e-5 * wiggle, "charge_drift/0": 1e-4 * wiggle,
            "shock_number": -2.6e-4 + 1e-5 * wiggle, "hessian_step": steps,
            "sharpness_raw": -2.6e-4 + 1e-5 * wiggle, "lambda_min_raw": -3e-4 + 1e-5 * wiggle,
            "sharpness_preconditioned": 2000.0 + 300.0 * wiggle, "lambda_min_preconditioned": -400.0 + 0 * wiggle}
    metrics = [{"step": 5, "train_loss": 0.3, "test_loss": 0.4, "test_accuracy": 0.5},
               {"step": 11, "train_loss": 0.1, "test_loss": 0.2, "test_accuracy": 0.75}]
    _report.make_plots(str(tmp_path), traj, metrics, [])
    assert len(figures) == len(_report.PLOTS)
    cut = []
    try:
        for name, fig in zip(_report.PLOTS, figures):
            renderer = fig.canvas.get_renderer()
            for ax in fig.axes:
                for axis, lim in ((ax.yaxis, ax.get_ylim()), (ax.xaxis, ax.get_xlim())):
                    lo, hi = min(lim), max(lim)
                    for tick in axis.get_major_ticks():
                        if not lo - 1e-9 * (hi - lo) <= tick.get_loc() <= hi + 1e-9 * (hi - lo):
                            continue  # (a tick outside the view is not drawn)
                        for label in (tick.label1, tick.label2):
                            if label.get_visible() and label.get_text():
                                box = label.get_window_extent(renderer)
                                if box.x0 < 0 or box.x1 > fig.bbox.width:
                                    cut.append((name, label.get_text(), round(box.x0), round(box.x1)))
    finally:
        for fig in figures:
            plt.close(fig)
    assert not cut, cut


def test_allocator_reexec_imports_the_package_this_process_runs(tmp_path, monkeypatch):
    # the command re-executes itself once for the allocator settings; it did so as `python -m quotient_sgd.cli`,
    # which puts the working directory first on sys.path: started from a directory holding a `quotient_sgd`
    # package (a checkout of another version), the re-executed process ran that one, not the installed command
    import subprocess
    import sys

    from quotient_sgd import cli

    for name in ("QSGD_NO_MALLOC_TUNING", cli._REEXEC_MARK, *cli.MALLOC_SETTINGS):
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(cli.os, "execve", lambda exe, args, env: calls.append((exe, args, env)))
    cli._maybe_reexec(["quotient-sgd", "frobnicate"])
    assert len(calls) == 1
    exe, args, env = calls[0]
    assert all(env[k] == v for k, v in cli.MALLOC_SETTINGS.items()) and env[cli._REEXEC_MARK] == "1"
    shadow = tmp_path / "quotient_sgd"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise SystemExit('the quotient_sgd of the working directory ran')\n")
    (shadow / "cli.py").write_text("")
    env = {**env, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # (this process's own import path)
    res = subprocess.run(args, executable=exe, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown subcommand 'frobnicate'" in res.stderr, (res.returncode, res.stderr)
