"""Runner behaviours on inputs beyond the other runner tests: float64 enabled beside strict dtype promotion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd import data as qdata
from quotient_sgd.runner import build, init_params
from helpers import sweep_records, tiny_settings


def test_classification_evaluation_under_x64_counts_the_correct_predictions(x64):
    """With ``jax_enable_x64`` on, ``jnp.argmax`` gives int64 class indices and the labels are int32: under strict
    dtype promotion the evaluation's ``argmax(out) == y`` was refused, and every classification run (the digits
    MLP and CNN, the grokking Transformer, sparse parity) failed at its first chunk's evaluation.  The accuracy is
    the fraction of examples whose largest logit is their label (counted here in NumPy), the loss the mean
    cross-entropy (computed here in float64 from the same logits)."""
    s = tiny_settings(**{"data.name": "sparse_parity", "data.n_bits": 6, "data.k": 2, "data.n_train": 32,
                         "data.n_test": 16, "data.batch_size": 8})
    b = build(s)
    params = jax.jit(lambda: init_params(b, 3, 0.0))()
    batch = qdata.full_batch(b.dataset, "test")

    @jax.jit
    def evaluated(params, batch):
        return b.eval_fn(params, batch), nnx.merge(b.graphdef, params)(batch["x"])

    ev, logits = evaluated(params, batch)
    logits, y = np.asarray(logits, np.float64), np.asarray(batch["y"])
    assert float(ev["accuracy"]) == np.mean(np.argmax(logits, axis=-1) == y)
    z = logits - logits.max(axis=-1, keepdims=True)
    ce = np.log(np.exp(z).sum(axis=-1)) - z[np.arange(len(y)), y]
    np.testing.assert_allclose(float(ev["loss"]), ce.mean(), rtol=1e-5)
    assert jnp.dtype(ev["accuracy"].dtype) == jnp.float32


def test_init_params_refuses_a_scale_that_is_no_finite_number_at_least_0():
    """``init_params(b, seed, -1.0)`` (or NaN) returned the parameters of ``init_gauge = 0`` without a word (the
    re-gauging is kept only where the scale is > 0), and ``True`` re-gauged with a scale of 1; ``config.init_gauge``
    refuses all three.  Each is a ``ValueError`` naming ``init_gauge``, raised before anything is computed; the
    scales allowed (0, None, a NumPy or JAX float, a traced value) still trace."""
    from helpers import tiny_settings as _tiny

    b = build(_tiny())
    for bad in (-1.0, -1e-30, float("nan"), float("inf"), True, np.bool_(False), "0.5", (0.5,), np.ones(2)):
        with pytest.raises(ValueError, match=r"init_params: init_gauge=.* is not allowed; need a finite number >= 0"):
            init_params(b, 0, bad)
    shapes = jax.eval_shape(lambda: init_params(b, 0, 0.0))
    for good in (0, None, np.float32(0.5), jnp.float32(2.0), 3):
        assert jax.eval_shape(lambda g=good: init_params(b, 0, g)) == shapes
    assert jax.eval_shape(jax.vmap(lambda g: init_params(b, 0, g)), jnp.ones(2)) is not None


def test_report_keeps_the_outputs_of_a_run_whose_trajectory_does_not_load(tmp_path):
    """A finished run whose ``trajectory.npz`` no longer loads (torn by a crash of the machine) and whose
    ``trajectory_parts/`` were removed (a finished run no longer reads them): ``report`` redrew its plots and
    summary from an empty trajectory over those drawn from the whole one ("steps: 0 of 6", "trajectory read from
    nothing: no trajectory.npz and no trajectory parts (a run stopped before its first chunk)"), exit status 0.
    It is refused naming trajectory.npz and why, and nothing is written; ``load_trajectory`` says the file does
    not load."""
    import os
    import warnings

    from quotient_sgd.runner import RunDirError, load_trajectory, report
    from quotient_sgd.runner._rundir import write_config, write_json

    wd = tmp_path / "run"
    (wd / "plots").mkdir(parents=True)
    write_config(str(wd / "config.json"), tiny_settings(6))
    write_json(str(wd / "run.json"), {"wall_s": 1.0, "resumed_from": 0, "diverged": None})
    (wd / "trajectory.npz").write_bytes(b"PK\x03\x04 torn")
    (wd / "summary.md").write_text("# Run `tiny`\n\n- steps: 6 of 6\n")
    (wd / "plots" / "loss.png").write_bytes(b"drawn from 6 steps")
    before = {p: p.read_bytes() for p in wd.rglob("*") if p.is_file()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (load_trajectory's warning that the file does not load)
        with pytest.raises(RunDirError, match=r"trajectory\.npz holds no trajectory that loads.*BadZipFile.*the "
                                              r"same `quotient-sgd run` command run again computes"):
            report(str(wd))
        assert {p: p.read_bytes() for p in wd.rglob("*") if p.is_file()} == before
        source = load_trajectory(str(wd)).source
    assert "trajectory.npz does not load" in source and "no trajectory.npz" not in source, source
    assert sorted(os.listdir(wd)) == ["config.json", "plots", "run.json", "summary.md", "trajectory.npz"]


def test_a_finished_run_whose_trajectory_is_in_no_file_computes_it_again(tmp_path):
    """Run again, the same finished run (its trajectory.npz torn, its trajectory_parts/ removed) assembled its
    trajectory from no part: an empty trajectory.npz was written over the torn one, and its plots and summary
    redrawn from it ("0 steps"), exit status 0.  It computes the steps again from the newest kept checkpoint its
    parts reach (step 0: none), with a warning; the trajectory is the first one bit for bit (a deterministic run),
    and so are the metric rows."""
    import shutil

    from quotient_sgd.runner import run

    s = tiny_settings(3, **{"checkpoint.every": 2})
    wd = str(tmp_path / "run")
    first = run(s, wd).trajectory
    with open(f"{wd}/metrics.jsonl") as f:
        rows = f.read()
    shutil.rmtree(f"{wd}/trajectory_parts")
    with open(f"{wd}/trajectory.npz", "r+b") as f:
        f.truncate(100)
    with pytest.warns(RuntimeWarning, match="trajectory.npz does not load"):
        again = run(s, wd)
    assert again.steps_done == 3 and again.resumed_from == 0
    with np.load(f"{wd}/trajectory.npz") as z:
        assert sorted(z.files) == sorted(first) and all(np.array_equal(z[k], first[k]) for k in first)
    with open(f"{wd}/metrics.jsonl") as f:
        assert f.read() == rows


def test_a_finished_sweep_whose_member_trajectory_is_in_no_file_computes_it_again(tmp_path):
    """The same for a sweep (test above: a run): run again, a finished sweep one of whose members had a torn
    trajectory.npz and no trajectory_parts/ wrote an empty trajectory.npz for that member ("unfinished (0 of 3
    steps)" in the table).  It resumes from the newest kept checkpoint the members' parts reach (step 0 here) and
    computes every member's steps again: the same trajectories and rows, bit for bit."""
    import shutil

    from quotient_sgd.runner import sweep

    s = tiny_settings(3, **{"checkpoint.every": 2, "sweep.seed": (), "sweep.members_per_device": 1})
    wd = str(tmp_path / "sw")
    one = jax.devices()[:1]  # (one member at a time on one device: the program a run of these settings compiles)
    sweep(s, wd, devices=one)
    member = [f"{wd}/members/{i:03d}" for i in range(2)]
    first, rows = [], []
    for m in member:
        with np.load(f"{m}/trajectory.npz") as z, open(f"{m}/metrics.jsonl") as f:
            first.append({k: z[k] for k in z.files})
            rows.append(f.read())
    shutil.rmtree(f"{member[1]}/trajectory_parts")
    with open(f"{member[1]}/trajectory.npz", "r+b") as f:
        f.truncate(100)
    with pytest.warns(RuntimeWarning, match="has no trajectory part of the chunk from step 0 on"):
        sweep(s, wd, devices=one)
    for m, traj, text in zip(member, first, rows):
        with np.load(f"{m}/trajectory.npz") as z:
            assert sorted(z.files) == sorted(traj) and all(np.array_equal(z[k], traj[k]) for k in traj), m
        with open(f"{m}/metrics.jsonl") as f:
            assert f.read() == text, m


def test_report_keeps_the_table_of_a_sweep_whose_member_trajectory_does_not_load(tmp_path):
    """``report`` of a sweep one of whose members has a torn trajectory.npz and no trajectory parts rewrote the
    sweep's table with that member "unfinished (0 of 3 steps)" and its curve left out; it is refused naming the
    member's trajectory.npz, and nothing is written."""
    import warnings

    from quotient_sgd.runner import RunDirError, report

    sw = tmp_path / "sw"
    sweep_records(sw, steps=3)
    (sw / "members" / "001" / "trajectory.npz").write_bytes(b"PK\x03\x04 torn")
    (sw / "summary.md").write_text("| 001 | 1 | 2 | 0.1 | 0.2 | - | ok |\n")
    before = {p: p.read_bytes() for p in sw.rglob("*") if p.is_file()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(RunDirError, match=r"members/001'? holds no trajectory that loads.*BadZipFile"):
            report(str(sw))
    assert {p: p.read_bytes() for p in sw.rglob("*") if p.is_file()} == before
