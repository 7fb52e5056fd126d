"""Cases of the run directory's plots and summary beyond the other runner tests: what is drawn for short,
sparse and non-finite series."""

from __future__ import annotations

import types

import numpy as np
import pytest

from quotient_sgd.runner import _report


@pytest.fixture
def figs(monkeypatch):
    """The figures ``make_plots`` draws, kept open while the test reads them (pyplot's ``close`` recorded
    instead of called), closed after it."""
    plt = _report._plt()
    drawn = []
    monkeypatch.setattr(_report, "_plt", lambda: types.SimpleNamespace(subplots=plt.subplots, close=drawn.append))
    yield drawn
    for fig in drawn:
        plt.close(fig)


def _invisible_points(line) -> int:
    """How many finite points of a ``Line2D`` draw nothing: no finite neighbour to join and no marker there."""
    y = np.asarray(line.get_ydata(), np.float64)
    f = np.isfinite(y)
    alone = f & ~np.r_[False, f[:-1]] & ~np.r_[f[1:], False]
    if line.get_marker() not in (None, "None", "", " "):
        every = line.get_markevery()
        alone &= ~(np.asarray(every, bool) if every is not None else np.ones_like(f))
    return int(alone.sum())


def test_a_point_with_no_finite_neighbour_is_drawn(tmp_path, figs):
    """A line draws nothing through a lone point: a one-step run's loss, a Hessian measured once
    (``observables.hessian_every`` beyond the run's steps: 12 steps, every 50), a value between non-finite ones.
    ``hessian.png`` of such a run was an empty frame under a legend of six series, ``loss.png`` of a one-step run
    showed the evaluations and no training loss.  Such points are now marked; every finite point is visible."""
    n = 12
    traj = {"step": np.arange(n), "loss": np.r_[0.3, np.nan, 0.2, np.full(n - 3, 0.1)],
            "hessian_step": np.zeros(n, np.int32), "sharpness_raw": np.full(n, 4.5),
            "sharpness_preconditioned": np.full(n, 20.0), "grad_norm": np.full(n, 0.5)}
    _report.make_plots(str(tmp_path), traj, [], [])
    one = {"step": np.arange(1), "loss": np.r_[0.25], "grad_norm": np.r_[0.5]}
    _report.make_plots(str(tmp_path), one, [{"step": 0, "test_loss": 0.3, "train_loss": 0.2}], [])
    lines = [ln for fig in figs for ax in fig.axes for ln in ax.lines if np.isfinite(ln.get_ydata()).any()]
    assert len(figs) == 2 * len(_report.PLOTS) and len(lines) >= 10
    assert [ln.get_label() for ln in lines if _invisible_points(ln)] == []


def test_a_series_with_no_finite_value_is_not_called_unrecorded(tmp_path, figs):
    """A run diverged at step 0 (``init_gauge=200``: the first loss is nan) recorded its loss; ``loss.png`` and
    ``events.png`` said "loss: not recorded" / "detected events: not recorded".  They now say the loss holds no
    finite value and how many steps it has; a series never recorded is still "not recorded"."""
    _report.make_plots(str(tmp_path), {"step": np.arange(1), "loss": np.r_[np.nan]}, [], [])
    said = " | ".join(t.get_text() for fig in figs for ax in fig.axes for t in ax.texts)
    assert "loss: no finite value recorded in train loss (batch) (1 step)" in said, said
    assert "detected events: no finite value recorded in loss (1 step)" in said, said
    assert "gradient norm: raw vs canonical (quotient): not recorded" in said, said


def test_the_loss_plot_legend_names_the_accuracy_curve(tmp_path, figs):
    """``loss.png`` of a classification run draws the test accuracy (dotted, right axis) and its legend, that of
    the loss axis alone, had no entry for it.  One legend now names every curve of both axes."""
    traj = {"step": np.arange(4), "loss": np.r_[2.3, 2.0, 1.8, 1.5]}
    rows = [{"step": s, "train_loss": 2.0 - s / 10, "test_loss": 2.1 - s / 10, "test_accuracy": 0.3 + s / 10}
            for s in (1, 3)]
    _report.make_plots(str(tmp_path), traj, rows, [])
    fig = figs[_report.PLOTS.index("loss")]
    curves = {ln.get_label() for ax in fig.axes for ln in ax.lines}
    named = {t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()}
    assert curves == {"train loss (batch)", "test loss", "train loss (full)", "test accuracy"}
    assert named == curves, named


def test_log_axis_tick_labels_stay_inside_the_figure(tmp_path, figs):
    """A log axis spanning less than a decade (a one-step run: losses 0.22-0.25) labels its minor ticks
    "2.55x10^-1"; the fixed left margin of 0.75 in cut them to ".55x10^-1", misreading every value.  The margin
    now fits the measured labels."""
    traj = {"step": np.arange(1), "loss": np.r_[0.2447]}
    _report.make_plots(str(tmp_path), traj, [{"step": 0, "test_loss": 0.2536, "train_loss": 0.2211}], [])
    fig = figs[_report.PLOTS.index("loss")]
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    box = ax.yaxis.get_tightbbox(fig.canvas.get_renderer())
    labels = [t.get_text() for t in ax.get_yticklabels(minor=True) if t.get_text()]
    assert labels and box.x0 >= 0, (box.x0, labels)


def test_events_crossing_two_levels_at_one_step_are_two_rows_of_the_summary(tmp_path):
    """A momentum run (lr 30, momentum 0.9) folds past ``fold_edge`` 1.9 and the edge 3.8 at step 1: two events
    of one kind, variant and strength, differing in ``details["level"]``.  ``summary.md`` listed them as two
    identical rows ``| 1 | fold | step | 190.57... |``.  The level is now a column of the table."""
    from quotient_sgd.config import default_config, from_dict

    s = from_dict(default_config().to_dict())
    events = [{"step": 1, "kind": "fold", "strength": 190.57, "variant": "step", "details": {"level": lv}}
              for lv in (1.9, 3.8)] + [{"step": 3, "kind": "divergence", "strength": "inf", "details": {}}]
    text = _report.write_summary(str(tmp_path), s, {"step": np.arange(4), "loss": np.ones(4)}, [], events,
                                 diverged=None, wall_s=None, resumed_from=None, detect_error=None)
    rows = [ln for ln in text.splitlines() if ln.startswith("| 1 |") or ln.startswith("| 3 |")]
    assert len(rows) == 3 and len(set(rows)) == 3, rows
    assert "| 1.9 |" in rows[0] and "| 3.8 |" in rows[1] and rows[2] == "| 3 | divergence |  |  | inf |", rows
