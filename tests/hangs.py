"""A hung test fails on its own, says where it hung, and takes nothing else down with it.

pytest-timeout alone is a poor end for an asyncio test: it raises inside the event loop's
``select``, its traceback shows only that, and the test's task stays pending in the session's
event loop, where it runs on during later fixtures and can hold the whole run open. So:

- an ``async def`` test's body runs under :func:`asyncio.timeout`, set below pytest-timeout's
  limit: at the deadline the test task is *cancelled* (its ``finally`` blocks and ``async with``
  exits run, nothing is left pending) and the failure's traceback ends at the await it was
  stuck in;
- after the run, threads that would keep the interpreter from exiting (an unclosed aiosqlite
  connection's worker, an abandoned loop's executor) are named and the process exits with the
  run's status instead of waiting for them for ever.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import threading
import traceback
from collections.abc import Callable, Coroutine, Generator
from typing import Any

import pytest
from pytest_asyncio.plugin import Coroutine as AsyncTestItem

EXIT_STATUS = pytest.StashKey[int]()
DEADLINE_SHARE = 0.8
"""The share of pytest-timeout's limit (which also covers setup and teardown) the body gets."""
THREADS_GRACE_SECONDS = 5.0


def body_deadline(item: pytest.Item) -> float | None:
    """Seconds the test body may take: a share of its pytest-timeout limit; None for no limit."""
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        limit = marker.args[0]
    else:  # pytest-timeout's --timeout, else its ini setting
        limit = item.config.getoption("timeout", None) or item.config.getini("timeout")
    seconds = float(limit or 0)
    return seconds * DEADLINE_SHARE if seconds > 0 else None


class TestHung(AssertionError):
    """The test body outlived its deadline; the chained CancelledError shows where it waited."""


def bounded(test: Callable[..., Coroutine[Any, Any, Any]], seconds: float) -> Callable[..., Coroutine[Any, Any, Any]]:
    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> Any:
        deadline = asyncio.timeout(seconds)
        try:
            async with deadline:
                return await test(*args, **kwargs)
        except TimeoutError as error:
            if deadline.expired():
                raise TestHung(f"the test did not finish within {seconds:.0f} s and was cancelled; "
                               "the traceback above ends where it was waiting") from error
            raise

    return run


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    seconds = body_deadline(item)
    if not isinstance(item, AsyncTestItem) or seconds is None:
        return (yield)
    test = item.obj
    item.obj = bounded(test, seconds)
    try:
        return (yield)
    finally:
        item.obj = test


def _blocking_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate()
            if thread.is_alive() and not thread.daemon and thread is not threading.main_thread()]


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Exit now if a leaked thread would hold the interpreter open (after a grace period)."""
    left = _blocking_threads()
    for thread in left:
        thread.join(THREADS_GRACE_SECONDS / len(left))
    left = _blocking_threads()
    if not left:
        return
    frames = sys._current_frames()
    print(f"\n!!! {len(left)} thread(s) left running would keep the interpreter from exiting; "
          "exiting without them:", file=sys.stderr)
    for thread in left:
        print(f"--- {thread.name}", file=sys.stderr)
        if (frame := frames.get(thread.ident or -1)) is not None:
            traceback.print_stack(frame, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(config.stash.get(EXIT_STATUS, 1))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[EXIT_STATUS] = int(exitstatus)
