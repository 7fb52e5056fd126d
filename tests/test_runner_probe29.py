"""Runs, sweeps, the CLI and the run directory's files: cases beyond the earlier runner tests."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_text_files_and_report_output_under_an_ascii_locale(tmp_path):
    """Under an ASCII locale (``LC_ALL=C`` with ``PYTHONUTF8=0``: Python then opens text files and stdout as
    ASCII), a run named ``网络`` (in its config file) computed its steps and then failed writing ``summary.md`` in a
    ``UnicodeEncodeError`` traceback, and ``quotient-sgd report`` of it failed printing the summary.  The run
    directory's text files are UTF-8 whatever the locale, and ``report`` prints a character stdout cannot encode as
    a backslash escape.  A command-line argument Python decoded with ``surrogateescape`` (``--config.name=网络``
    under that locale: it failed the same way, in "surrogates not allowed") is written as the bytes it was typed
    as.  (The two functions every such write goes through, in a fresh interpreter: the locale is read at
    start-up.)"""
    path = tmp_path / "summary.md"
    code = ("import sys\n"
            "from quotient_sgd._durable import durable_write\n"
            "from quotient_sgd.cli import _echo\n"
            "assert sys.stdout.encoding.lower().replace('-', '') in ('ascii', 'ansi_x3.41968'), sys.stdout.encoding\n"
            f"with durable_write({str(path)!r}) as f:\n"
            "    f.write('# Run `\\u7f51\\u7edc`\\n')\n"
            f"with durable_write({str(path) + '2'!r}) as f:\n"  # (an argument decoded with surrogateescape)
            "    f.write(sys.argv[1])\n"
            "_echo('# Run `\\u7f51\\u7edc`')\n"
            "_echo(sys.argv[1])\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_")}
    env.update(PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", LC_ALL="C", LANG="C", PYTHONIOENCODING="")
    r = subprocess.run([sys.executable, "-c", code, "网络".encode("utf-8")], env=env, capture_output=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert path.read_bytes() == "# Run `网络`\n".encode("utf-8")
    assert (tmp_path / "summary.md2").read_bytes() == "网络".encode("utf-8")
    assert r.stdout.splitlines()[0] == b"# Run `\\u7f51\\u7edc`", r.stdout


# ---- a sweep's data set is copied to every device ----------------------------------------------------------------
def _settings(path, **over):
    from quotient_sgd.config import load_config, validate

    c = load_config(path)
    c.logging.plots = False
    for k, v in over.items():
        c.update_from_flattened_dict({k: v})
    return validate(c)


def _held_bytes(dataset) -> int:
    import jax

    return sum(x.nbytes for x in jax.tree.leaves(dataset))


def test_dataset_bytes_is_what_the_programs_hold():
    """The arithmetic of ``dataset_bytes`` against the arrays a run builds (regression, images, tokens, bits)."""
    from quotient_sgd.config import Settings
    from quotient_sgd.runner._build import make_dataset
    from quotient_sgd.runner._memory import dataset_bytes

    for over in ({"data.name": "teacher_student", "data.dout": 3, "data.n_train": 30, "data.n_test": 9},
                 {"data.name": "digits", "model.name": "cnn"}, {"data.name": "digits", "model.name": "mlp"},
                 {"data.name": "modular_arithmetic", "data.p": 5, "model.name": "transformer"},
                 {"data.name": "modular_arithmetic", "data.p": 5, "model.name": "mlp"},
                 {"data.name": "sparse_parity", "data.n_bits": 6, "data.k": 2, "data.n_train": 20, "data.n_test": 7}):
        s = Settings().replace(**over)
        assert dataset_bytes(s) == _held_bytes(make_dataset(s)), over


def test_a_sweep_whose_data_copies_do_not_fit_is_refused(tmp_path, monkeypatch):
    """A sweep places a copy of the data set on every device (replicated over the mesh) besides the run's own; on
    CPU devices each copy is this machine's memory (a 200 MB array replicated on 8 CPU devices grew the process by
    1.5 GB).  The memory check counted the members' states, trajectories and gradients and not the data: a sweep on
    8 devices whose 9 copies of the data exceed the memory was accepted.  Refused now, naming the key that sizes
    the data set, before anything is written."""
    import jax

    import quotient_sgd.runner._memory as memory
    from quotient_sgd.config import ConfigError
    from quotient_sgd.runner import sweep
    from quotient_sgd.runner._build import make_dataset

    tiny = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
    s = _settings(tiny, **{"steps": 2, "checkpoint.every": 2, "data.n_train": 60000, "sweep.seed": (0,),
                           "sweep.lr": (0.01, 0.02)})
    devices = jax.devices()
    copies = (len(devices) + 1) * _held_bytes(make_dataset(s))
    monkeypatch.setattr(memory, "physical_memory", lambda: copies - 1)
    wd = str(tmp_path / "sw")
    with pytest.raises(ConfigError) as e:
        sweep(s, wd, devices=devices)
    msg = str(e.value)
    assert msg.startswith("config.data.n_train = 60000: the data set (") and "copy on every device" in msg, msg
    assert not os.path.exists(wd)


def test_a_run_whose_data_does_not_fit_its_accelerator_is_refused(monkeypatch):
    """On an accelerator a run's data set lives in the device's memory beside its state, a chunk of trajectory and
    a step; the check counted those alone, and a run whose data set did not fit beside them was accepted (to fail
    in XLA's out-of-memory error).  Refused naming the key that sizes the data set; device memory for exactly the
    four amounts (the data set's measured from the arrays built) lets it through."""
    import quotient_sgd.runner._memory as memory
    from quotient_sgd.config import ConfigError
    from quotient_sgd.runner._build import build

    tiny = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
    s = _settings(tiny, **{"steps": 10, "checkpoint.every": 10, "data.n_train": 20000})
    b = build(s)
    state, step, work = memory.footprint(b)
    data = _held_bytes(b.dataset)
    need = state + 10 * step + work + data
    monkeypatch.setattr(memory, "device_memory", lambda d: need - 1)
    with pytest.raises(ConfigError, match=r"^config\.data\.n_train = 20000: the data set takes .* on the run's "
                                          r"device.*use a smaller data\.n_train"):
        memory.check_run_memory(b, s)
    monkeypatch.setattr(memory, "device_memory", lambda d: need)
    memory.check_run_memory(b, s)
