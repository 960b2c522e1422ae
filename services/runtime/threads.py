"""Blocking work in worker threads that stops when its call does.

A coroutine awaiting `asyncio.to_thread` can be cancelled (the client went away, or the deadline
passed and `CallGate` cancelled the call) while its thread runs on: the CPU time is lost to every
other call, and whatever the coroutine held (an index's lock) is released under the running thread.
`run_in_thread` instead waits for the thread to return before the cancellation goes on, and sets the
call's `Stop`; work that takes long calls `stop.check(what)` between slices, which raises once the call
was cancelled or its deadline passed. `uninterrupted` does the same for a coroutine: a change that,
once begun, must finish even when its call is cancelled.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

import grpc

from services.runtime.errors import ServiceError, deadline_exceeded

P = ParamSpec("P")
T = TypeVar("T")


class Stop:
    """Tells work in a thread that its call is over: cancelled, or past `deadline` (time.time())."""

    def __init__(self, deadline: float | None = None) -> None:
        self.deadline = deadline
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def check(self, what: str) -> None:
        """Raises CANCELLED or DEADLINE_EXCEEDED, naming `what` (the work), once the call is over."""
        if self._cancelled.is_set():
            raise ServiceError(grpc.StatusCode.CANCELLED, f"{what} was cancelled")
        if self.deadline is not None and time.time() >= self.deadline:
            raise deadline_exceeded(f"{what} did not finish before the deadline")


async def uninterrupted(aw: Awaitable[T], on_cancel: Callable[[], None] | None = None) -> T:
    """Awaits `aw` to its end even when the caller is cancelled meanwhile (then `on_cancel` is called
    and, once `aw` is done, the cancellation goes on)."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            cancelled = True
            if on_cancel is not None:
                on_cancel()
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved, so that asyncio does not log it as never retrieved
        raise asyncio.CancelledError
    return task.result()


async def run_in_thread(stop: Stop, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """fn(*args, **kwargs) in a worker thread. If the calling task is cancelled meanwhile, `stop` is
    cancelled and the cancellation goes on only once fn has returned."""
    return await uninterrupted(asyncio.to_thread(fn, *args, **kwargs), stop.cancel)
