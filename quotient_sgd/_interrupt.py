"""Telling an interrupt apart from the exception a library made of it."""

from __future__ import annotations


def interrupt_in(exc: BaseException) -> KeyboardInterrupt | None:
    """The ``KeyboardInterrupt`` (Ctrl-C; the command's SIGTERM is one too) that ``exc`` is, or was raised from
    (its ``__cause__`` / ``__context__`` chain), else ``None``.  An extension module built with pybind11 (those of
    matplotlib) turns any exception raised while it initialises into ``ImportError("initialization failed")``
    raised from it: a Ctrl-C during the first import of matplotlib arrived as that ``ImportError``."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None
