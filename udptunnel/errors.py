"""The two kinds of failure that reach the user, each with its exit status.

Anything raised as one of these carries a message fit to print as one line; ``cli.py`` does
the printing and picks the exit status. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class ConfigError(ValueError):
    """The command line or the names in it are wrong: exit status 2."""


class TunnelError(Exception):
    """The tunnel could not be set up or failed while running: exit status 1."""


def messages(group: BaseExceptionGroup[Any]) -> Iterator[str]:
    """The message of every error in ``group``, however deeply nested: a system error in the
    system's words (``Connection refused``, not ``[Errno 111] Connection refused``)."""
    for exc in leaves(group):
        if isinstance(exc, OSError) and exc.strerror:
            yield exc.strerror if exc.filename is None else f"{exc.filename}: {exc.strerror}"
        else:
            yield str(exc) or type(exc).__name__


def leaves(group: BaseExceptionGroup[Any]) -> Iterator[BaseException]:
    """Every error in ``group``, however deeply nested."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from leaves(exc)
        else:
            yield exc
