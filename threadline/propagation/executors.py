"""Carry the audit context into thread-pool work.

A :class:`concurrent.futures.ThreadPoolExecutor` (and ``loop.run_in_executor``) runs functions in
worker threads that do **not** see the submitting code's context variables. These helpers copy
them at the moment of the call:

- ``threadline.submit(executor, fn, *args, **kwargs)``: like ``executor.submit``, with the
  current context;
- ``threadline.wrap(fn)``: ``fn`` bound to the context in force when it was wrapped (for
  ``executor.map``, callbacks, ``loop.run_in_executor``, ``threading.Thread(target=...)``).

Each call runs in its own copy of the captured context, so concurrent calls never see each
other's changes and nothing leaks back. asyncio needs no helper: a task created with
``asyncio.create_task``/``gather`` copies the context when it is created, and
``asyncio.to_thread`` copies it too.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import ParamSpec, TypeVar

from threadline.core.errors import ConfigurationError

P = ParamSpec("P")
R = TypeVar("R")

__all__ = ["submit", "wrap"]


def wrap(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` bound to the context variables in force now (the audit context among them).

    Every call runs in a fresh copy of that context: calls may overlap in several threads.
    """
    captured = contextvars.copy_context()

    @functools.wraps(fn)
    def run_in_captured_context(*args: P.args, **kwargs: P.kwargs) -> R:
        return captured.copy().run(fn, *args, **kwargs)

    return run_in_captured_context


def submit(executor: Executor, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
    """``executor.submit(fn, *args, **kwargs)``, running ``fn`` under the current context.

    Thread pools only: context variables cannot be sent to another process. For a process
    pool, pass ``threadline.current().to_json()`` as an argument and rebuild it there with
    ``AuditContext.from_json``.
    """
    if isinstance(executor, ProcessPoolExecutor):
        raise ConfigurationError(
            "threadline.submit() carries the context into threads, not processes: pass "
            "threadline.current().to_json() to the function and use AuditContext.from_json() there"
        )
    captured = contextvars.copy_context()

    def call() -> R:
        return captured.run(fn, *args, **kwargs)

    return executor.submit(call)
