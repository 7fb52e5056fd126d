"""`quotient-sgd run` on the default config writes every file of the run directory; `report` regenerates them."""

import os
import subprocess
import sys

import pytest

from helpers import child_xla_flags

RUN_FILES = ("config.json", "trajectory.npz", "metrics.jsonl", "events.json", "summary.md")
PLOTS = ("loss", "observables", "charges", "shock_fold", "hessian", "events")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _quotient_sgd(args, cwd, xla_flags=None):
    """The command in a subprocess, compiling with XLA's default options, or with ``xla_flags`` when given."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    return subprocess.run([sys.executable, "-m", "quotient_sgd.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _check_run_dir(d):
    for f in RUN_FILES:
        assert os.path.getsize(os.path.join(d, f)) > 0, f
    assert [n for n in os.listdir(os.path.join(d, "checkpoints")) if n.isdigit()]
    for p in PLOTS:
        path = os.path.join(d, "plots", f"{p}.png")
        with open(path, "rb") as fh:
            head = fh.read(8)
        assert head == PNG_MAGIC and os.path.getsize(path) > 2000, p


def _run_and_report(tmp_path, extra, capsys, xla_flags=None):
    """`run` in a subprocess from a directory with no configs/ (the embedded default), then `report` of its
    directory through the command's ``main`` in this process."""
    from quotient_sgd.cli import main

    res = _quotient_sgd(["run", *extra], cwd=tmp_path, xla_flags=xla_flags)
    assert res.returncode == 0, res.stderr[-3000:]
    d = tmp_path / "runs" / "quickstart"
    _check_run_dir(d)
    os.remove(d / "plots" / "loss.png")
    os.remove(d / "summary.md")
    capsys.readouterr()
    assert main(["quotient-sgd", "report", str(d)]) == 0, capsys.readouterr().err[-3000:]
    _check_run_dir(d)
    assert "# Run `quickstart`" in capsys.readouterr().out


def test_default_run_short(tmp_path, capsys):
    """The default config, shortened to 30 steps without the Hessian (compiles in a fraction of the time; the
    Hessian plot is then a labelled placeholder) and compiled with the suite's XLA options (tests/conftest.py:
    ~5x faster to compile than XLA's defaults, which test_compilation_cache_reused_and_results_unchanged and the
    slow variant run the command with) to keep the suite fast."""
    _run_and_report(tmp_path, ["--config.steps=30", "--config.checkpoint.every=30",
                               "--config.observables.hessian_every=0"], capsys, xla_flags=child_xla_flags())


@pytest.mark.slow
def test_default_run_full(tmp_path, capsys):
    """`quotient-sgd run` with no arguments at all."""
    _run_and_report(tmp_path, [], capsys)


def test_help_and_unknown_subcommand(tmp_path):
    assert "quotient-sgd run" in _quotient_sgd(["help"], cwd=tmp_path).stdout
    res = _quotient_sgd(["frobnicate"], cwd=tmp_path)
    assert res.returncode == 2 and "unknown subcommand" in res.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("checkpointed", [True, False])
def test_cli_interrupt_says_what_was_kept(tmp_path, monkeypatch, capsys, checkpointed):
    """Ctrl-C during `run` (KeyboardInterrupt out of the runner, which has waited for the checkpoint in flight):
    exit status 130 and a message naming the checkpoint step to resume from, not a traceback."""
    import quotient_sgd.runner as runner_pkg
    from quotient_sgd.cli import main

    wd = tmp_path / "runs" / "x"

    def interrupted_run(settings, workdir, **kw):
        os.makedirs(os.path.join(workdir, "checkpoints", "300") if checkpointed else workdir)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_pkg, "run", interrupted_run)
    code = main(["quotient-sgd", "run", "--config.steps=1000", f"--workdir={wd}"])
    err = capsys.readouterr().err
    assert code == 130
    assert ("checkpoint of step 300" in err) == checkpointed, err
    assert "same command" in err and "Traceback" not in err, err


def test_compilation_cache_reused_and_results_unchanged(tmp_path):
    """`quotient-sgd run` keeps JAX's persistent compilation cache in QSGD_COMPILATION_CACHE: a second run of
    the same config with another learning rate loads its programs from disk (JAX logs the cache hits) and a
    cached program gives the uncached run's trajectory bitwise; "off" writes no cache.  Every program is cached
    (JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0, which the command keeps): with the command's 0.2 s threshold a
    small program compiled in 0.1 s by the first run and in 0.3 s by the second, on a loaded machine, was written by
    the second only, and "nothing compiled anew" depended on the machine's load."""
    import numpy as np

    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
    cache = tmp_path / "cache"

    def run(workdir, lr, cache_setting):
        env = dict(os.environ, QSGD_COMPILATION_CACHE=cache_setting, JAX_DEBUG_LOG_MODULES="jax._src.compiler",
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        env.pop("XLA_FLAGS", None)
        res = subprocess.run([sys.executable, "-m", "quotient_sgd.cli", "run", f"--config={tiny}", "--config.steps=20",
                              f"--config.optim.lr={lr}", "--config.logging.plots=False", f"--workdir={workdir}"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        with np.load(os.path.join(workdir, "trajectory.npz")) as z:
            return res.stderr, {k: z[k] for k in z.files}

    err_a, a = run(tmp_path / "a", 0.05, str(cache))
    entries = sorted(os.listdir(cache))
    assert any("chunk_step" in e for e in entries), entries
    assert "Persistent compilation cache hit for 'jit_chunk_step'" not in err_a
    err_b, b = run(tmp_path / "b", 0.02, str(cache))
    assert "Persistent compilation cache hit for 'jit_chunk_step'" in err_b
    assert sorted(os.listdir(cache)) == entries  # nothing compiled anew
    _, c = run(tmp_path / "c", 0.02, "off")
    assert sorted(os.listdir(cache)) == entries
    assert sorted(b) == sorted(c)
    for k in b:
        np.testing.assert_array_equal(b[k], c[k], err_msg=k)
    assert not np.array_equal(a["loss"], b["loss"])


def test_start_up_imports_only_what_a_run_needs():
    """Building and running import neither scikit-learn (the digits are read from its data file) nor
    scipy.optimize (weight matching imports it on first use): ~1.2 s of every command's start."""
    code = ("import sys; from quotient_sgd.config import load_config, quickstart_path, validate; "
            "from quotient_sgd.runner import build; build(validate(load_config(quickstart_path()))); "
            "print(sorted(m for m in ('sklearn', 'scipy.optimize') if m in sys.modules))")
    env = dict(os.environ, XLA_FLAGS=child_xla_flags())  # (what is imported does not depend on XLA's options)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout
