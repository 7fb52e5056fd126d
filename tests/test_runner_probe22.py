"""Cases beyond the other tests of configs, data, the command line and run directories (round 22)."""

from __future__ import annotations

import pytest

import quotient_sgd.config._validate as v
from quotient_sgd import data
from quotient_sgd.config import ConfigError, default_config, validate
from quotient_sgd.data import _tasks


# ---- defect 1: absurd data sizes failed in a bare MemoryError (or NumPy's "Maximum allowed size exceeded") ------
@pytest.mark.parametrize("make, arg", [
    (lambda: data.teacher_student(n_train=10**12), "n_train"),
    (lambda: data.teacher_student(teacher_hidden=10**13), "teacher_hidden"),
    (lambda: data.modular_arithmetic(p=10**6), "p"),
    (lambda: data.modular_arithmetic(p=10**30, encoding="tokens"), "p"),
    (lambda: data.sparse_parity(n_bits=10**12), "n_bits"),
    (lambda: data.sparse_parity(n_bits=5, n_train=20, n_test=10**12), "n_test"),
])
def test_absurd_data_sizes_are_refused_naming_the_argument(make, arg):
    """``teacher_student(n_train=10**12)`` raised ``MemoryError: Unable to allocate 58.2 TiB``,
    ``modular_arithmetic(p=10**30)`` NumPy's bare ``ValueError: Maximum allowed size exceeded``: nothing named the
    argument or what is allowed.  Each is now a ``ValueError`` naming the argument and its largest allowed value."""
    with pytest.raises(ValueError, match=rf"{arg}=\d+ is not allowed; .*need an integer <= \d+"):
        make()


def test_the_largest_allowed_size_is_the_boundary(monkeypatch):
    """The value the refusal offers builds (on a machine of 1 MiB, monkeypatched), one more is refused."""
    monkeypatch.setattr(_tasks, "_physical_memory", lambda: 2**20)
    import re

    with pytest.raises(ValueError, match=r"teacher_student: n_train=100000 is not allowed; .*GiB of memory") as e:
        data.teacher_student(n_train=10**5, n_test=4, din=2)
    n = int(re.search(r"need an integer <= (\d+)", str(e.value)).group(1))
    assert _tasks.peak_bytes("teacher_student", n_train=n, n_test=4, din=2, dout=1, teacher_hidden=16) <= 2**20
    assert data.teacher_student(n_train=n, n_test=4, din=2).num_train == n
    with pytest.raises(ValueError, match=rf"n_train={n + 1} is not allowed"):
        data.teacher_student(n_train=n + 1, n_test=4, din=2)


def test_config_counts_the_teacher_weights(monkeypatch):
    """``data.din = data.teacher_hidden = 10^5`` with 2 examples validated (the estimate counted the examples, not
    the teacher's din x teacher_hidden weights, 75 GiB); on a 16 GiB machine it is refused naming data.din."""
    monkeypatch.setattr(v, "physical_memory", lambda: 16 * 2**30)
    c = default_config()
    c.data.name, c.data.din, c.data.teacher_hidden = "teacher_student", 10**5, 10**5
    c.data.n_train, c.data.n_test, c.data.batch_size = 1, 1, 1
    c.model.name, c.model.hidden = "mlp", (4,)
    with pytest.raises(ConfigError, match=r"config\.data\.din = 100000: .*74\.5 GiB to build"):
        validate(c)
    c.data.din = 10   # (2 MiB of teacher weights: accepted)
    validate(c)


# ---- defect 2: a Ctrl-C in the first second of `quotient-sgd run` ended it with status -2, -6, -11 or 1 -------
def _python(args, tmp_path, **env_extra):
    """Run ``python args`` with ``tmp_path`` first on PYTHONPATH and the allocator re-exec enabled; (status,
    stderr)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("QSGD_NO_MALLOC_TUNING", "QSGD_MALLOC_TUNED", "QSGD_UNBLOCK_SIGINT", *MALLOC_KEYS)}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(env_extra)
    p = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120,
                       cwd=str(tmp_path))
    return p.returncode, p.stderr


MALLOC_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def test_ctrl_c_inside_code_built_from_a_string_exits_130_under_python_m(tmp_path):
    """A Ctrl-C handled while ``exec`` ran code built from a string (dataclasses, ``namedtuple`` and ``typing``
    build code so while jax and flax are imported) made CPython 3.11 record the ``KeyboardInterrupt`` as unhandled
    although the command caught it: ``python -m quotient_sgd.cli`` (what ``quotient-sgd`` re-executes itself as)
    printed "interrupted before anything was written" and then ended killed by SIGINT, status -2.  The interrupt
    is now delivered again once that code is left."""
    (tmp_path / "probe22_exec.py").write_text(
        "import os, signal, sys, time\n"
        "from quotient_sgd.cli import _sigterm_raises\n"
        "try:\n"
        "    with _sigterm_raises((signal.SIGINT,)):\n"
        "        exec('import os, signal\\nos.kill(os.getpid(), signal.SIGINT)\\nfor i in range(1000): pass')\n"
        "        print('after exec', file=sys.stderr)\n"
        "        time.sleep(5)\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n")
    code, err = _python(["-m", "probe22_exec"], tmp_path)
    assert code == 130 and "after exec" in err, (code, err)


def test_ctrl_c_while_the_reexecuted_interpreter_starts_exits_130(tmp_path):
    """The command re-executes itself (allocator settings); a Ctrl-C while the new interpreter started (here: in
    its ``sitecustomize``, as ``site`` runs) ended it in Python's own traceback, status 1 (or killed by SIGINT,
    -2, before Python's handler was installed), instead of the command's status 130.  SIGINT is now blocked
    across the ``execve`` and delivered once the command's handler is in place."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os, signal\n"
        "if os.environ.get('QSGD_MALLOC_TUNED') == '1':\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n")
    code, err = _python(["-c", "import sys; from quotient_sgd.cli import main; sys.exit(main())", "report",
                         str(tmp_path / "no_such_run")], tmp_path)
    assert code == 130 and "interrupted" in err and "Traceback" not in err, (code, err)


def test_a_signal_inside_an_extension_module_init_is_deferred():
    """A Ctrl-C while jaxlib's extension modules initialised (nanobind calls Python code there) raised inside them
    and ended the process in ``std::terminate`` (status -6) or a segmentation fault (-11); the handler now
    recognises such a frame (and one of code built from a string) and delivers the signal again later."""
    import importlib.machinery
    import sys

    from quotient_sgd.cli import _unsafe_to_raise

    ns: dict = {"sys": sys}
    exec(compile("def create_module(self, spec):\n    return sys._getframe()\n",
                 "<frozen importlib._bootstrap_external>", "exec"), ns)
    ext = importlib.machinery.ExtensionFileLoader("probe22_ext", "/nonexistent/probe22_ext.so")
    src = importlib.machinery.SourceFileLoader("probe22_src", "/nonexistent/probe22_src.py")
    # (the frames below this test are outside, as the handler's own are: the test runner may itself run from code
    # built from a string, as pytest-xdist's workers do)
    here = sys._getframe()
    assert _unsafe_to_raise(ns["create_module"](ext, None), (here,))
    assert not _unsafe_to_raise(ns["create_module"](src, None), (here,))
    assert not _unsafe_to_raise(here, (here.f_back,))
    assert _unsafe_to_raise(eval("sys._getframe()", {"sys": sys}), (here,))
    # code built from a string that the command itself runs from (`python -c`) is outside: no deferral
    inner, outer = eval("(here(), sys._getframe())", {"sys": sys, "here": lambda: sys._getframe()})
    assert _unsafe_to_raise(inner) and not _unsafe_to_raise(inner, (outer,))


# ---- defect 3: a sparse-parity data set too large for memory was refused as "every input is a training input" ----
def test_sparse_parity_too_large_is_refused_for_its_size_not_as_covering_every_input(monkeypatch):
    """``data.n_bits = 14, data.n_train = 2^14`` on a machine too small for the data set: validation built it to
    see whether the draws cover all 2^14 inputs, the data set refused its size, and that refusal was read as
    "the 16384 training inputs are all 2^n_bits inputs, so none is left to hold out" (16384 draws with
    replacement cover ~63% of them).  It is now refused for its size, naming data.n_train."""
    monkeypatch.setattr(v, "physical_memory", lambda: 2**20)
    monkeypatch.setattr(_tasks, "_physical_memory", lambda: 2**20)
    c = default_config()
    c.data.name, c.data.n_bits, c.data.n_train, c.data.n_test, c.data.batch_size = "sparse_parity", 14, 2**14, 16, 8
    c.model.name = "mlp"
    with pytest.raises(ConfigError, match=r"config\.data\.n_train = 16384: makes a data set of 16400 examples"):
        validate(c)


def test_config_and_data_count_the_same_bytes():
    """Validation's estimate of a data set's memory is the data generators' own (``peak_bytes``), so a config
    that validates builds its data set on the same machine, and one the generators refuse is refused first."""
    import itertools

    from quotient_sgd.config import DataSettings

    for n_train, n_test, din, h in itertools.product([1, 10**6], [0, 10**5], [1, 1000], [1, 10**4]):
        d = DataSettings(name="teacher_student", n_train=n_train, n_test=n_test, din=din, dout=3, teacher_hidden=h)
        assert v.data_bytes(d, "mlp")[0] == _tasks.peak_bytes(
            "teacher_student", n_train=n_train, n_test=n_test, din=din, dout=3, teacher_hidden=h)
    for p, (model, enc) in itertools.product([2, 1000], [("mlp", "onehot"), ("transformer", "tokens")]):
        assert v.data_bytes(DataSettings(name="modular_arithmetic", p=p), model)[0] == _tasks.peak_bytes(
            "modular_arithmetic", p=p, encoding=enc)
    d = DataSettings(name="sparse_parity", n_bits=5000, n_train=7, n_test=3)
    assert v.data_bytes(d, "mlp")[0] == _tasks.peak_bytes("sparse_parity", n_train=7, n_test=3, n_bits=5000)
