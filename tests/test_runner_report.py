"""`report` regenerates summary.md without losing what the run recorded (wall time, resume step, divergence), and
a finished run or sweep run again (nothing to compute) keeps its recorded wall time."""

import json
import os
import re

import jax

from helpers import tiny_settings
from quotient_sgd.runner import report, run, sweep


def _settings(**over):
    return tiny_settings(20, **over)


def _summary(d):
    with open(os.path.join(d, "summary.md")) as f:
        return f.read()


def _without_files(text):
    """The summary without its list of files (``report`` regenerates plots that the run itself did not write)."""
    return text.split("## Files")[0]


def _line(text, start):
    found = [line for line in text.splitlines() if line.startswith(start)]
    assert len(found) == 1, (start, text)
    return found[0]


def test_report_and_rerun_keep_wall_time_and_resume_step(tmp_path):
    wd = str(tmp_path / "r")
    s = _settings()
    run(s, wd, max_chunks=1)
    run(s, wd)  # resumed from step 10
    first = _summary(wd)
    wall = _line(first, "- wall time: ")
    assert "resumed from step 10" in _line(first, "- steps: ")

    run(s, wd)  # finished: nothing computed, the record stays
    again = _summary(wd)
    assert _line(again, "- wall time: ") == wall
    assert _line(again, "- steps: ") == _line(first, "- steps: ")

    os.remove(os.path.join(wd, "summary.md"))
    text = report(wd)
    assert _line(text, "- wall time: ") == wall and "resumed from step 10" in text
    assert text == _summary(wd)
    assert _without_files(text) == _without_files(first)

    # a directory written before run.json existed: its summary.md is the record
    os.remove(os.path.join(wd, "run.json"))
    assert _without_files(report(wd)) == _without_files(first)


def test_report_keeps_the_divergence_without_events(tmp_path):
    wd = str(tmp_path / "r")
    run(_settings(**{"optim.lr": 50.0}), wd)
    first = _summary(wd)
    div = _line(first, "- **diverged at step ")
    assert re.match(r"- \*\*diverged at step \d+: non-finite", div)
    os.remove(os.path.join(wd, "events.json"))
    os.remove(os.path.join(wd, "summary.md"))
    text = report(wd)
    assert _line(text, "- **diverged at step ") == div
    assert _line(text, "- wall time: ") == _line(first, "- wall time: ")
    with open(os.path.join(wd, "events.json")) as f:
        assert [e for e in json.load(f) if e["kind"] == "divergence"]


def test_sweep_report_and_rerun_keep_wall_time(tmp_path):
    wd = str(tmp_path / "sw")
    s = _settings(**{"sweep.seed": (), "sweep.lr": (0.02, 0.05)})
    sweep(s, wd, devices=jax.devices()[:1])
    wall = _line(_summary(wd), "- wall time: ")
    sweep(s, wd, devices=jax.devices()[:1])  # finished: nothing computed
    assert _line(_summary(wd), "- wall time: ") == wall
    os.remove(os.path.join(wd, "summary.md"))
    assert _line(report(wd), "- wall time: ") == wall


def test_summary_lists_the_files_that_exist(tmp_path):
    """An interrupted run reported before it finishes has no trajectory.npz yet: its summary does not list one;
    the finished run's does."""
    wd = str(tmp_path / "r")
    s = _settings()
    run(s, wd, max_chunks=1)
    files = _line(report(wd), "config.json")
    assert "trajectory.npz" not in files and "trajectory_parts/" in files and "plots/loss.png" in files
    run(s, wd)
    files = _line(_summary(wd), "config.json")
    assert files.startswith("config.json, trajectory.npz, metrics.jsonl, events.json, run.json, summary.md")


def test_report_of_a_resumed_interrupted_run_detects_its_events_again(tmp_path):
    """``report`` on an interrupted run writes the events of its trajectory so far; once the run has resumed and
    is interrupted again, ``report`` detects the events of the longer trajectory, not the stale file's."""
    wd = str(tmp_path / "r")
    s = tiny_settings(30, **{"checkpoint.every": 10})
    run(s, wd, max_chunks=1)
    report(wd)
    stale = [{"step": 1, "kind": "stale_marker", "strength": 1.0, "observables": {}, "variant": "quotient",
              "invariant": True, "details": {}}]  # stands for the events of the first 10 steps
    with open(os.path.join(wd, "events.json"), "w") as f:
        json.dump(stale, f)
    run(s, wd, max_chunks=1)  # resumed from step 10, interrupted at 20
    assert "stale_marker" not in report(wd)
    with open(os.path.join(wd, "events.json")) as f:
        assert all(e["kind"] != "stale_marker" for e in json.load(f))


def test_report_of_a_run_without_steps_draws_every_plot_quietly(tmp_path):
    """A run killed before its first chunk holds its config.json only: ``report`` writes the summary (0 steps)
    and every plot without a warning (matplotlib used to warn that the events plot had no labelled artist)."""
    import warnings

    from quotient_sgd.runner._report import PLOTS

    s = tiny_settings(20)
    (tmp_path / "config.json").write_text(json.dumps(s.to_dict()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = report(str(tmp_path))
    assert "- steps: 0 of 20" in text
    assert sorted(os.listdir(tmp_path / "plots")) == sorted(f"{p}.png" for p in PLOTS)


def test_summary_names_the_settings_its_optimiser_reads():
    """summary.md's optimiser line lists the keys that optimiser reads: Adam's b1 / b2 / eps, not SGD's momentum
    (an AdamW run's summary said momentum=0.0)."""
    from quotient_sgd.runner._report import _optimiser_text

    adamw = _settings(**{"optim.name": "adamw", "optim.momentum": 0.0, "optim.weight_decay": 0.01,
                         "optim.b2": 0.98}).optim
    text = _optimiser_text(adamw)
    assert text.startswith("adamw lr=") and "b2=0.98" in text and "weight_decay=0.01" in text, text
    assert "momentum" not in text and "nesterov" not in text and "clip_norm" not in text, text
    sgd = _settings(**{"optim.momentum": 0.9, "optim.nesterov": True, "optim.clip_norm": 1.0}).optim
    text = _optimiser_text(sgd)
    assert "momentum=0.9" in text and "nesterov=True" in text and "clip_norm=1.0" in text, text
    assert "b1" not in text and "eps" not in text, text
