"""Background tasks that cannot die silently.

`start_task` creates a task with a name and a done-callback: a task that ends with an exception (anything but
cancellation) is logged as `task_crashed` with its name and the exception, and `on_crash` hears of it (so the
owner can say not-ready, or stop what depends on it). Without this, a bug in a loop ends its task with no log
line until the task is collected, and nothing notices.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import structlog

log = structlog.get_logger("ferryman")

T = TypeVar("T")


def report_crash(task: asyncio.Task[Any], on_crash: Callable[[BaseException], None] | None = None) -> None:
    """The done-callback: log `task_crashed` when `task` ended with an exception other than cancellation."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is None:
        return
    log.error("task_crashed", task=task.get_name(), error=f"{type(exc).__name__}: {exc}", exc_info=exc)
    if on_crash is not None:
        on_crash(exc)


def start_task(coro: Coroutine[Any, Any, T], name: str,
               on_crash: Callable[[BaseException], None] | None = None) -> asyncio.Task[T]:
    """`coro` as a named task on the running loop, whose crash is logged (and handed to `on_crash`)."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    task.add_done_callback(lambda done: report_crash(done, on_crash))
    return task
