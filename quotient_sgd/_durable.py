"""Files written so that a crash of the machine leaves the old file or the new one, never a torn one.

A file is written to a temporary name, flushed and ``fsync``-ed, renamed over its destination (``os.replace``),
and the directory holding it is ``fsync``-ed, which makes the rename itself durable.  Without the first
``fsync`` the rename can reach the disk before the data (ext4 ``data=ordered`` orders some renames, XFS and
most network file systems do not): a crash then leaves the destination present but empty or partial.
"""

from __future__ import annotations

import contextlib
import os
from typing import IO, Iterator


def fsync_directory(path: str) -> None:
    """``fsync`` the directory ``path`` (the entries created, renamed or removed in it reach the disk).  Nothing
    where the file system refuses it: a directory that cannot be opened, or whose ``fsync`` fails (``EINVAL`` on
    some network and FUSE file systems; directories cannot be opened at all on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def durable_write(path: str, mode: str = "w", suffix: str = ".tmp") -> Iterator[IO]:
    """Write ``path`` atomically and durably: yields the file ``path + suffix`` open in ``mode`` (``"w"`` or
    ``"wb"``); when the block ends without an exception the file is flushed, ``fsync``-ed and closed, renamed to
    ``path`` (``os.replace``), and the directory holding it is ``fsync``-ed (:func:`fsync_directory`).  When the
    block raises, ``path`` is left as it was (the temporary file stays, as a kill would leave it).  Text is written
    as UTF-8 whatever the locale says (under an ASCII locale, ``LC_ALL=C`` with ``PYTHONUTF8=0``, the summary.md of
    a run named ``网络`` failed in a ``UnicodeEncodeError`` after the run had computed), and a command-line argument
    that Python decoded with ``surrogateescape`` (non-ASCII bytes under such a locale: ``--config.name=网络``) as
    the bytes it was typed as."""
    tmp = path + suffix
    with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8", "errors": "surrogateescape"})) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_directory(os.path.dirname(os.path.abspath(path)))
