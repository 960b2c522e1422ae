"""Work in worker threads that stops when its call does."""

import asyncio
import time

import grpc
import pytest

from services.runtime.errors import ServiceError
from services.runtime.threads import Stop, run_in_thread, uninterrupted


def test_stop_checks_cancel_and_deadline():
    Stop().check("work")
    Stop(time.time() + 60).check("work")
    with pytest.raises(ServiceError) as err:
        Stop(time.time() - 1).check("work")
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    stop = Stop()
    stop.cancel()
    with pytest.raises(ServiceError) as err:
        stop.check("work")
    assert err.value.code == grpc.StatusCode.CANCELLED


async def test_a_cancelled_call_returns_once_its_thread_stopped():
    slices = []

    def work(stop: Stop) -> None:
        for i in range(200):
            stop.check("work")
            slices.append(i)
            time.sleep(0.005)

    stop = Stop()
    task = asyncio.create_task(run_in_thread(stop, work, stop))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    done = len(slices)
    await asyncio.sleep(0.05)
    assert len(slices) == done < 200
    assert await run_in_thread(Stop(), sum, [1, 2]) == 3


async def test_uninterrupted_finishes_what_it_began():
    finished = []

    async def change():
        await asyncio.sleep(0.05)
        finished.append(True)
        return 1

    task = asyncio.create_task(uninterrupted(change()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished == [True]
    assert await uninterrupted(change()) == 1
