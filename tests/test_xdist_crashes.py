"""The suite's xdist scheduling (tests/xdist_crashes.py): a crashed worker never hangs the run.

A test suite run with ``-n 2 --dist loadgroup`` in a scratch directory, with tests that crash their worker once, crash
it every time, fail an assertion, pass, and share an xdist group.  The run must end (not hang), rerun the
once-crashing test and pass it, fail the always-crashing test after one rerun, and fail the failing test without a
rerun.
"""

import os
import re
import subprocess
import sys
import textwrap

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

CONFTEST = f"""
import sys
sys.path.insert(0, {TESTS_DIR!r})
from xdist_crashes import (
    pytest_handlecrashitem, pytest_report_teststatus, pytest_terminal_summary, pytest_xdist_make_scheduler,
)
"""

SUITE = """
import os
import signal

import pytest

MARK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crashed_once")


def crash():
    os.kill(os.getpid(), signal.SIGSEGV)


def test_passes():
    assert True


def test_crashes_once():
    if not os.path.exists(MARK):
        open(MARK, "w").close()
        crash()


def test_crashes_always():
    crash()


def test_fails():
    assert 1 == 2


@pytest.mark.xdist_group("together")
@pytest.mark.parametrize("i", range(3))
def test_grouped(i):
    assert i >= 0


@pytest.mark.parametrize("i", range(4))
def test_many(i):
    assert i >= 0
"""


def test_a_crashed_worker_reruns_its_test_once_and_the_run_ends(tmp_path):
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_suite.py").write_text(textwrap.dedent(SUITE))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "XLA_"))}
    # only the plugin the scheduling needs (xdist): the other installed plugins (jaxtyping's imports JAX) cost ~1.5
    # CPU s in every worker the run starts, a replacement for each crash included
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "xdist", "-n", "2", "--dist", "loadgroup",
         "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path / "test_suite.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    summary = out.strip().splitlines()[-1]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary)}
    # passed: test_passes, test_crashes_once (on its rerun), 3 grouped, 4 many
    assert counts == {"failed": 2, "passed": 9, "rerun": 2}, summary
    assert re.search(r"FAILED .*test_fails\b", out)
    assert re.search(r"FAILED .*test_crashes_always\b", out)
    reruns = re.findall(r"^RERUN \S+::(\w+):", out, flags=re.M)
    assert sorted(reruns) == ["test_crashes_always", "test_crashes_once"], out
