"""Runs, sweeps, the CLI and the run directory's files: cases beyond the earlier runner tests."""

from __future__ import annotations

import os
import subprocess
import sys


def test_text_files_and_report_output_under_an_ascii_locale(tmp_path):
    """Under an ASCII locale (``LC_ALL=C`` with ``PYTHONUTF8=0``: Python then opens text files and stdout as
    ASCII), a run named ``网络`` (in its config file) computed its steps and then failed writing ``summary.md`` in a
    ``UnicodeEncodeError`` traceback, and ``quotient-sgd report`` of it failed printing the summary.  The run
    directory's text files are UTF-8 whatever the locale, and ``report`` prints a character stdout cannot encode as
    a backslash escape.  (The two functions every such write goes through, in a fresh interpreter: the locale is
    read at start-up.)"""
    path = tmp_path / "summary.md"
    code = ("import sys\n"
            "from quotient_sgd._durable import durable_write\n"
            "from quotient_sgd.cli import _echo\n"
            "assert sys.stdout.encoding.lower().replace('-', '') in ('ascii', 'ansi_x3.41968'), sys.stdout.encoding\n"
            f"with durable_write({str(path)!r}) as f:\n"
            "    f.write('# Run `\\u7f51\\u7edc`\\n')\n"
            "_echo('# Run `\\u7f51\\u7edc`')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_")}
    env.update(PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", LC_ALL="C", LANG="C", PYTHONIOENCODING="")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert path.read_bytes() == "# Run `网络`\n".encode("utf-8")
    assert r.stdout == b"# Run `\\u7f51\\u7edc`\n"
