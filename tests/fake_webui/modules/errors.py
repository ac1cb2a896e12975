"""Mirrors ``modules/errors.py`` (v1.10.1): ``report`` / ``display`` print to stderr; the fake also keeps the messages
in ``reported`` so tests can see what the WebUI would have printed."""

from __future__ import annotations

import sys
import traceback

reported: list[str] = []


def report(message: str, *, exc_info: bool = False) -> None:
    """Real: prints ``message`` (and the current traceback if ``exc_info``) to stderr."""
    text = message
    if exc_info:
        text += "\n" + traceback.format_exc()
    reported.append(text)
    print(text, file=sys.stderr)


def display(e: Exception, task: object, *, full_traceback: bool = False) -> None:
    """Real: prints ``*** Error {task}`` and the exception to stderr."""
    reported.append(f"*** Error {task}: {type(e).__name__}: {e}")
    print(f"*** Error {task}", file=sys.stderr)
    traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)


def record_exception() -> None:
    """Real: remembers the current exception for the sysinfo dump."""
    reported.append(traceback.format_exc())
