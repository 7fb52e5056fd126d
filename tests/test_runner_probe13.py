"""Runs and sweeps on what they lost or could not hold: blank lines inside ``metrics.jsonl`` (a resume dropped every
row after one), sweeps whose vmapped members, per-example gradients, Lanczos vectors, evaluation or trajectory do
not fit in memory (they went on to compute and ran out of it), ``steps`` near 2^31 (one tuple per chunk was built
before the first step), products of long sweep axes (listed before anything was checked), and sweep values that
are distinct in Python but one float32 member (run twice)."""

import json
import os

import jax
import numpy as np
import pytest

from quotient_sgd.config import ConfigError, load_config, validate
from quotient_sgd.runner import run, sweep
from quotient_sgd.runner._rundir import MetricsLog, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _tiny(**over):
    return validate(load_config(TINY, {"logging.plots": False, **over}))


def _read(path) -> str:
    with open(path) as f:
        return f.read()


def _rows(path):
    return [json.loads(line) for line in _read(path).splitlines() if line.strip()]


# ---- defect 1: a blank line inside metrics.jsonl --------------------------------------------------------------
def test_a_resume_keeps_the_rows_after_a_blank_line(tmp_path):
    """A blank (or whitespace-only) line inside ``metrics.jsonl`` ended the rows ``MetricsLog.truncate`` kept, so a
    resumed run lost every row after it (40 steps, 3 chunks done: the final metrics had steps [0, 5, 30, 35, 39]).
    Now the resumed run's rows are those of an uninterrupted run, each once; a torn last line is still dropped."""
    s = _tiny(steps=40)
    wd, ref = str(tmp_path / "r"), str(tmp_path / "ref")
    run(s, wd, max_chunks=3)
    path = os.path.join(wd, "metrics.jsonl")
    lines = _read(path).splitlines(True)
    lines.insert(2, "\n")
    lines.insert(5, "   \t\n")
    with open(path, "w") as f:
        f.writelines(lines + ['{"step": 30, "lo'])  # (and a kill while appending the next chunk's rows)
    run(s, wd)
    run(s, ref)
    got, want = _rows(path), _rows(os.path.join(ref, "metrics.jsonl"))
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 5, 9, 10, 15, 19, 20, 25, 29, 30, 35, 39]
    assert got == want
    assert all(line.strip() for line in _read(path).splitlines())  # (the truncation rewrote the file without them)


def test_blank_lines_and_a_line_that_is_no_row_in_the_middle(tmp_path):
    """``read_metrics`` and ``MetricsLog.truncate`` read the same rows: blank lines are skipped silently, a line
    before the last that is no row (a hand edit: not JSON, not an object, no integer step, a value that is no
    number) is left out with a warning naming it and the rows after it are kept; a torn last line is left out
    (with read_metrics's warning)."""
    path = str(tmp_path / "metrics.jsonl")
    text = ("\n".join([json.dumps({"step": 0, "loss": 1.0}), "", "  ", json.dumps({"step": 5, "loss": "nan"}),
                       "not json", "[1, 2]", json.dumps({"loss": 0.3}), json.dumps({"step": 7, "loss": "x"}),
                       json.dumps({"step": 10.0, "loss": 0.5}), json.dumps({"step": 15, "loss": 0.25}), ""])
            + '{"step": 20, "lo')
    with open(path, "w") as f:
        f.write(text)
    with pytest.warns(RuntimeWarning) as got:
        rows = read_metrics(path)
    assert [r["step"] for r in rows] == [0, 5, 10, 15] and np.isnan(rows[1]["loss"]), rows
    messages = [str(w.message) for w in got]
    for line in (5, 6, 7, 8):
        assert any(f"line {line} is not a metric row" in m for m in messages), messages
    assert any("line 11 is not a complete JSON row" in m and "4 row(s) read" in m for m in messages), messages
    with pytest.warns(RuntimeWarning) as got:
        MetricsLog(path).truncate(12)
    assert sorted(int(str(w.message).split("line ")[1].split()[0]) for w in got) == [5, 6, 7, 8]
    assert [json.loads(line)["step"] for line in _read(path).splitlines()] == [0, 5, 10]
    assert read_metrics(path)[2]["step"] == 10


# ---- defect 3: steps near 2^31 ----------------------------------------------------------------------------------
def test_the_chunk_schedule_is_lazy_and_equals_the_list_it_replaced():
    from quotient_sgd.runner._run import chunk_bounds

    def reference(start, total, every):
        out, a = [], start
        while a < total:
            b = min((a // every + 1) * every, total)
            out.append((a, b))
            a = b
        return out

    for start in range(13):
        for total in range(15):
            for every in (1, 2, 3, 5, 7):
                c, want = chunk_bounds(start, total, every), reference(start, total, every)
                assert list(c) == want and len(c) == len(want) and bool(c) == bool(want)
                for k in range(len(want) + 2):
                    assert list(c[:k]) == want[:k] and list(c[k:]) == want[k:]
    c = chunk_bounds(0, 2**31 - 1, 1)  # (a list of 2^31 tuples: minutes and ~200 GB before the first step)
    assert len(c) == 2**31 - 1 and c[-1] == (2**31 - 2, 2**31 - 1) and list(c[:2]) == [(0, 1), (1, 2)]
    assert chunk_bounds(7, 2**31 - 1, 100)[1] == (100, 200)


def test_a_trajectory_larger_than_memory_is_refused_and_a_long_run_starts_at_once(tmp_path, monkeypatch):
    """``steps = 2^31 - 1``: the trajectory (160 bytes a step for the tiny config, 320 GiB) is refused naming
    ``steps`` before anything is written; on a machine with the memory for it, the run starts at once (the schedule
    of its 2^31 one-step chunks is not built first)."""
    import quotient_sgd.runner._memory as memory

    s = _tiny(steps=2**31 - 1, **{"checkpoint.every": 1})
    wd = str(tmp_path / "r")
    with pytest.raises(ConfigError) as e:
        run(s, wd)
    msg = str(e.value)
    assert msg.startswith("config.steps = 2147483647: the trajectory records ") and "use fewer steps" in msg, msg
    assert not os.path.exists(wd)
    monkeypatch.setattr(memory, "physical_memory", lambda: 2**50)
    res = run(s, wd, max_chunks=2)
    assert res.steps_done == 2 and [r["step"] for r in read_metrics(os.path.join(wd, "metrics.jsonl"))] == [0, 1]


# ---- defect 2: what a sweep's members hold ----------------------------------------------------------------------
def _need(s, n, nd, m):
    """Bytes on the host of a sweep of ``n`` members over ``nd`` CPU devices with ``m`` per device."""
    from quotient_sgd.runner._build import build
    from quotient_sgd.runner._memory import footprint, sweep_memory_need

    return sum(sweep_memory_need(footprint(build(s)), s, n, nd, m, False)[0].values())


def test_a_fixed_members_per_device_beyond_memory_is_refused_before_anything(tmp_path, monkeypatch):
    import quotient_sgd.runner._memory as memory

    s = _tiny(steps=20, **{"sweep.members_per_device": 4})  # 8 members
    dev = jax.devices()[:2]
    monkeypatch.setattr(memory, "physical_memory", lambda: _need(s, 8, 2, 2))  # 2 per device fit, 4 do not
    wd = str(tmp_path / "sw")
    with pytest.raises(ConfigError) as e:
        sweep(s, wd, devices=dev)
    msg = str(e.value)
    assert msg.startswith("config.sweep.members_per_device = 4: 4 members per device on 2 device(s) run 8 members "
                          "at once") and "at most 2 per device might fit" in msg, msg
    assert not os.path.exists(wd)
    with pytest.raises(ConfigError, match=r"^sweep: members_per_device=4: "):  # (the argument, named as such)
        sweep(s.replace(**{"sweep.members_per_device": 0}), wd, devices=dev, members_per_device=4)
    assert not os.path.exists(wd)


def test_a_sweep_whose_members_do_not_fit_one_per_device_names_its_longest_axis(tmp_path, monkeypatch):
    """Five axes of 100 values, 10^10 members: refused naming the longest axis before the members are listed (a
    list of 10^10 dicts was built first) or anything is computed or written."""
    s = _tiny(steps=20, **{"sweep.seed": tuple(range(100)), "sweep.lr": tuple(0.01 * (i + 1) for i in range(100)),
                           "sweep.momentum": tuple(0.009 * i for i in range(100)),
                           "sweep.weight_decay": tuple(1e-4 * i for i in range(100)),
                           "sweep.init_gauge": tuple(0.01 * i for i in range(101))})
    wd = str(tmp_path / "sw")
    with pytest.raises(ConfigError) as e:
        sweep(s, wd, devices=jax.devices()[:1])
    msg = str(e.value)
    assert msg.startswith("config.sweep.init_gauge = (0.0, ") and "the sweep's 10100000000 members" in msg, msg
    assert "sweep fewer members" in msg and "more than this machine's memory" in msg, msg
    assert not os.path.exists(wd)


def test_an_automatic_grouping_is_chosen_among_those_that_fit(tmp_path, monkeypatch):
    """``sweep.members_per_device = 0``: the cost model chooses among groupings that fit the memory (it was
    offered all members on a device whatever they held)."""
    import quotient_sgd.runner._memory as memory
    import quotient_sgd.runner._sweep as sweep_module

    s = _tiny(steps=20)  # 8 members on one device
    offered = []

    def choose(**kw):
        offered.append(kw["max_per_device"])
        return kw["max_per_device"], {}

    monkeypatch.setattr(sweep_module, "choose_members_per_device", choose)
    monkeypatch.setattr(memory, "physical_memory", lambda: _need(s, 8, 1, 2))  # (2, 4, 8 per device: no padding)
    monkeypatch.setattr(sweep_module, "_temporary_bytes", lambda compiled: None)
    res = sweep(s, str(tmp_path / "sw"), devices=jax.devices()[:1])
    assert offered == [2] and res.schedule[-1]["members_per_device"] == 2, (offered, res.schedule)
    meta = json.loads(_read(tmp_path / "sw" / "sweep.json"))
    assert meta["measured_cost"]["memory_members_per_device"] == 2
    assert "memory allows at most 2 member(s) per device" in _read(tmp_path / "sw" / "summary.md")


def test_an_accelerator_chunk_too_large_for_its_memory_names_checkpoint_every(monkeypatch):
    import quotient_sgd.runner._memory as memory
    from quotient_sgd.runner._build import build

    s = _tiny(steps=10000, **{"checkpoint.every": 5000})
    b = build(s)
    state, step, work = memory.footprint(b)
    # (the device holds the data set too: quotient_sgd.runner._memory.dataset_bytes)
    monkeypatch.setattr(memory, "device_memory", lambda d: state + work + 100 * step + memory.dataset_bytes(s))
    with pytest.raises(ConfigError, match=r"^config\.checkpoint\.every = 5000: a chunk of 5000 steps records"):
        memory.check_run_memory(b, s)
    memory.check_run_memory(b, s.replace(**{"checkpoint.every": 100}))  # (fits)


# ---- validation against this machine's memory ------------------------------------------------------------------
@pytest.mark.parametrize("over, key", [
    # the noise temperature's per-example gradients: B copies of the parameters
    ({"observables.per_example_grads": True, "observables.noise_every": 10, "model.hidden": (4096, 4096),
      "data.name": "digits", "data.batch_size": 0}, "observables.per_example_grads"),
    # lanczos_steps = 100000 on 161 parameters: "Out of memory allocating 240001506024 bytes" in the first chunk
    ({"observables.hessian_every": 5, "observables.lanczos_steps": 100000}, "observables.lanczos_steps"),
    # the evaluation of the whole training split at once: "Out of memory allocating 98328017000 bytes"
    ({"data.n_train": 6_000_000, "model.hidden": (4096,)}, "data.n_train"),
    ({"data.name": "digits", "model.name": "cnn", "model.channels": (100000,)}, "model.channels"),
])
def test_what_a_step_or_an_evaluation_holds_is_checked_against_memory(monkeypatch, over, key):
    import quotient_sgd.config._validate as v

    monkeypatch.setattr(v, "physical_memory", lambda: 16 * 2**30)
    with pytest.raises(ConfigError) as e:
        validate(load_config(TINY, over))
    assert str(e.value).startswith(f"config.{key} = ") and "16 GiB of memory" in str(e.value), str(e.value)
    validate(load_config(TINY, over), check_memory=False)  # (a recorded config is not checked)


def test_sweep_values_equal_as_float32_are_one_member():
    """``sweep.lr = (0.1, 0.1 + 1e-12)`` ran two identical members (the programs take float32); so did zipped pairs
    equal as float32.  Distinct float32 values pass; many values are checked in one pass."""
    with pytest.raises(ConfigError, match=r"config\.sweep\.lr = .*same float32 number.*identical members"):
        _tiny(**{"sweep.lr": (0.1, 0.1 + 1e-12), "sweep.seed": ()})
    with pytest.raises(ConfigError, match=r"config\.sweep\.mode = 'zip': zip pairs \['seed', 'lr'\] repeat"):
        _tiny(**{"sweep.mode": "zip", "sweep.seed": (1, 1, 2), "sweep.lr": (0.1, 0.1 + 1e-12, 0.1)})
    _tiny(**{"sweep.mode": "zip", "sweep.seed": (1, 1), "sweep.lr": (0.1, 0.2)})
    n = 20000
    seeds, lrs = tuple(range(n)), tuple(0.01 + 1e-6 * i for i in range(n))
    assert len(_tiny(**{"sweep.mode": "zip", "sweep.seed": seeds, "sweep.lr": lrs}).sweep.seed) == n
    with pytest.raises(ConfigError, match=r"repeat the member\(s\) \[\(0, 0\.01\)\]"):
        _tiny(**{"sweep.mode": "zip", "sweep.seed": seeds + (0,), "sweep.lr": lrs + (0.01,)})


@pytest.mark.parametrize("over, needle", [
    ({"optim.lr": 1e39}, "config.optim.lr = 1e+39: the programs compute in float32, where 1e+39 is inf"),
    ({"optim.lr": 1e-50}, "config.optim.lr = 1e-50: the programs compute in float32, where 1e-50 is 0.0"),
    ({"sweep.lr": (0.1, 1e-50)}, "sweep.lr[1] = 1e-50 is not"),
    ({"init_gauge": 1e39}, "config.init_gauge = 1e+39: the programs compute in float32"),
])
def test_float_settings_that_float32_cannot_hold_are_refused(over, needle):
    """``optim.lr = 1e39`` validated as "a finite number > 0" and ran with an infinite learning rate (the programs
    take it as float32); ``1e-50`` ran with 0."""
    with pytest.raises(ConfigError) as e:
        _tiny(**over)
    assert needle in str(e.value), str(e.value)
    _tiny(**{"optim.lr": 3e38, "optim.weight_decay": 1e-50})
