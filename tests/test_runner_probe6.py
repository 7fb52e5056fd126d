"""Interruptions of the command and a config detail: SIGTERM ends `run` and `sweep` as Ctrl-C does (the
checkpoint in flight finishes, a message, exit status 143, the directory resumes bitwise); the message after an
interrupt says exactly which metric rows lie past the checkpoint; repeated observable names are refused."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import checkpoint_steps, child_xla_flags, load_metric_rows, load_trajectory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
#: 120 steps: signalled after its checkpoint of step >= 30, the run has 90 steps (9 checkpoints) left to resume
STEPS = 120
ARGS = [f"--config={TINY}", f"--config.steps={STEPS}", "--config.checkpoint.every=10", "--config.logging.plots=False",
        "--config.observables.names=('loss','grad_norm','charges')"]


def _signal_after_checkpoint(cmd, env, run_dir, step, sig, timeout):
    """Start ``cmd``, send it ``sig`` as soon as a checkpoint of at least ``step`` exists in ``run_dir``; returns
    ``(exit code, stderr)``."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        steps = checkpoint_steps(run_dir)
        if steps and steps[-1] >= step:
            os.kill(proc.pid, sig)
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_sigterm_mid_run_finishes_the_checkpoint_says_where_and_resumes_bitwise(tmp_path):
    """A real `quotient-sgd run` sent SIGTERM mid-run: exit status 143 (128 + 15), a message naming the
    checkpoint to resume from, no orbax temporary directory; the resume (the runner call the same command makes)
    then ends with the trajectory and the metric rows of an uninterrupted run (bitwise; each row once)."""
    from quotient_sgd.config import load_config, validate
    from quotient_sgd.runner import run

    wd = str(tmp_path / "term")
    env = dict(os.environ, QSGD_NO_MALLOC_TUNING="1", QSGD_COMPILATION_CACHE="off", XLA_FLAGS=child_xla_flags())
    cmd = [sys.executable, "-m", "quotient_sgd.cli", "run", *ARGS, f"--workdir={wd}"]
    code, err = _signal_after_checkpoint(cmd, env, wd, 30, signal.SIGTERM, timeout=120)
    assert code == 128 + signal.SIGTERM, (code, err[-3000:])
    last = checkpoint_steps(wd)[-1]
    assert 30 <= last < STEPS
    assert "terminated (SIGTERM)" in err and f"checkpoint of step {last}" in err, err
    assert f"resume from step {last}" in err and "Traceback" not in err, err
    ckpt_dir = os.path.join(wd, "checkpoints")
    assert all(n.isdigit() for n in os.listdir(ckpt_dir)), os.listdir(ckpt_dir)  # no orbax tmp directory
    assert not os.path.exists(os.path.join(wd, "summary.md"))
    # the message is exact about the rows written past the checkpoint
    past = [r["step"] for r in load_metric_rows(wd) if r["step"] >= last]
    assert ("rows of steps" in err) == bool(past) and (not past or f"rows of steps {last} to {max(past)}" in err), \
        (past, err)

    # the resume: the call the same command makes (in this process, compiled as the child was: child_xla_flags),
    # which refuses a directory of another config; then an uninterrupted run for reference
    c = load_config(TINY)
    c.update_from_flattened_dict({"steps": STEPS, "checkpoint.every": 10, "logging.plots": False,
                                  "observables.names": ("loss", "grad_norm", "charges")})
    resumed = run(validate(c), wd)
    assert resumed.steps_done == STEPS and resumed.resumed_from == last
    ref = str(tmp_path / "ref")
    run(validate(c), ref)
    a, b = load_trajectory(wd), load_trajectory(ref)
    assert sorted(a) == sorted(b)
    for k in b:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ra = load_metric_rows(wd)
    steps = [r["step"] for r in ra]
    assert steps == sorted(set(steps)), "duplicated or unordered metric rows"
    assert ra == load_metric_rows(ref)
    with open(os.path.join(wd, "summary.md")) as f:
        assert f"resumed from step {last}" in f.read()


@pytest.mark.parametrize("cmd", ["run", "sweep"])
def test_cli_sigterm_is_an_interrupt_with_status_143_and_the_handler_is_restored(tmp_path, monkeypatch, capsys,
                                                                                 cmd):
    """SIGTERM during `run` or `sweep` (delivered inside the runner): exit status 143 and the interrupt message,
    no traceback; the SIGTERM handler in place before main() is back afterwards."""
    import quotient_sgd.runner as runner_pkg
    from quotient_sgd.cli import main

    wd = tmp_path / "x"
    seen = {}

    def terminated(settings, workdir, **kw):
        os.makedirs(os.path.join(workdir, "checkpoints", "300"))
        seen["handler"] = signal.getsignal(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.0)  # the handler raises in this frame long before the sleep ends
        raise AssertionError("SIGTERM did not interrupt the call")

    class Outer(Exception):
        pass

    def before(signum, frame):  # the caller's handler (and this process's guard against SIGTERM's default action)
        raise Outer(signum)

    monkeypatch.setattr(runner_pkg, cmd, terminated)
    previous = signal.signal(signal.SIGTERM, before)
    try:
        code = main(["quotient-sgd", cmd, "--config.steps=1000", f"--workdir={wd}"])
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert code == 143, err
    assert "terminated (SIGTERM)" in err and "checkpoint of step 300" in err and "Traceback" not in err, err
    assert callable(seen["handler"]) and seen["handler"] is not before


def test_sigterm_is_held_back_until_a_checkpoint_write_ends():
    """SIGTERM with a Python handler installed (as the command installs one) inside ``sigint_deferred`` (around
    every checkpoint save / close) does not interrupt the block; the handler runs when the block ends, and both
    handlers are restored.  With SIGTERM's default action the block leaves it alone."""
    from quotient_sgd.runner._rundir import sigint_deferred

    class Term(Exception):
        pass

    def handler(signum, frame):
        raise Term(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        finished = []
        with pytest.raises(Term), sigint_deferred():
            assert signal.getsignal(signal.SIGTERM) is not handler
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            finished.append(True)
        assert finished == [True]
        assert signal.getsignal(signal.SIGTERM) is handler
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with sigint_deferred():
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def _rows(path, steps):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in steps)


@pytest.mark.parametrize("layout", ["run", "sweep"])
def test_interrupt_message_names_the_rows_past_the_checkpoint(tmp_path, layout):
    """The rows of a chunk are written before its checkpoint (and a sweep writes them while the next chunk
    computes): after an interrupt between the two the directory holds rows past its last checkpoint.  The message
    says which, and that the resume recomputes them, instead of "the metrics up to it"; without such rows it
    says nothing more."""
    from quotient_sgd.cli import _interrupted

    wd = str(tmp_path / layout)
    os.makedirs(os.path.join(wd, "checkpoints", "1800"))
    logs = ([os.path.join(wd, "metrics.jsonl")] if layout == "run" else
            [os.path.join(wd, "members", f"{i:03d}", "metrics.jsonl") for i in range(2)])
    for i, p in enumerate(logs):
        _rows(p, range(0, 1800 + 100 * i, 5))  # the second member holds rows up to step 1895
    last = 1795 + 100 * (len(logs) - 1)
    msg = _interrupted(wd)
    assert msg.startswith("interrupted; ") and "checkpoint of step 1800" in msg
    assert ("rows of steps 1800 to" in msg) == (layout == "sweep"), msg
    if layout == "sweep":
        assert f"rows of steps 1800 to {last}" in msg and "drops and computes again" in msg, msg
        assert "members' metrics.jsonl" in msg
    # a run whose rows end before the checkpoint: nothing more; a run with a torn last line: its last whole row
    _rows(logs[0], range(0, 1900, 5))
    with open(logs[0], "a") as f:
        f.write('{"step": 19')
    msg = _interrupted(wd, "terminated (SIGTERM)")
    assert msg.startswith("terminated (SIGTERM); ") and "rows of steps 1800 to 1895" in msg, msg
    assert "resume from step 1800" in msg


def test_repeated_observable_names_are_refused():
    """``observables.names`` listing a name twice is refused, naming the key, the repeated name and what is
    allowed (as repeated sweep values are); each name once passes."""
    from helpers import tiny_settings

    from quotient_sgd.config import ConfigError

    with pytest.raises(ConfigError) as e:
        tiny_settings(**{"observables.names": ("loss", "grad_norm", "loss")})
    msg = str(e.value)
    assert "observables.names" in msg and "repeats ['loss']" in msg and "'charges'" in msg, msg
    with pytest.raises(ConfigError, match=r"repeats \['charges', 'grad_norm'\]"):
        tiny_settings(**{"observables.names": ("grad_norm", "charges", "grad_norm", "charges")})
    assert tiny_settings(**{"observables.names": ("loss", "grad_norm")}).observables.names == ("loss", "grad_norm")
