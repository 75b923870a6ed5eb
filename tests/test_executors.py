"""The audit context in thread pools (threadline.wrap / threadline.submit) and asyncio tasks."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pytest

import threadline
from threadline import ActorRef, AuditContext, ConfigurationError


def actor_id() -> str | None:
    actor = threadline.current().actor
    return None if actor is None else actor.id


def test_plain_thread_pool_does_not_carry_the_context() -> None:
    with ThreadPoolExecutor(1) as pool, threadline.context(actor="user:1"):
        assert pool.submit(actor_id).result() is None  # why the helpers exist


def test_submit_carries_the_context_of_the_call() -> None:
    with ThreadPoolExecutor(2) as pool:
        with threadline.context(actor="user:1"):
            first = threadline.submit(pool, actor_id)
        with threadline.context(actor="user:2"):
            second = threadline.submit(pool, actor_id)
        assert (first.result(), second.result()) == ("1", "2")
        assert pool.submit(actor_id).result() is None  # nothing left behind in the pool's threads


def test_wrap_binds_the_context_at_wrap_time_and_allows_overlapping_calls() -> None:
    barrier = threading.Barrier(8)

    def work(n: int) -> tuple[int, str | None]:
        with threadline.context(actor=f"user:{n}"):  # changes inside stay inside
            barrier.wait(timeout=5)
        return n, actor_id()

    with threadline.context(actor="user:wrapped"):
        wrapped = threadline.wrap(work)
    assert wrapped.__name__ == "work"
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(wrapped, range(8)))  # the same wrapper, concurrently
    assert results == [(n, "wrapped") for n in range(8)]
    assert threadline.current().is_empty


def test_wrap_for_threads_and_run_in_executor() -> None:
    seen: list[str | None] = []
    with threadline.context(actor="user:t"):
        thread = threading.Thread(target=threadline.wrap(lambda: seen.append(actor_id())))
    thread.start()
    thread.join()

    async def main() -> tuple[str | None, str | None]:
        loop = asyncio.get_running_loop()
        with threadline.context(actor="user:e"):
            plain = await loop.run_in_executor(None, actor_id)  # does not copy the context
            wrapped = await loop.run_in_executor(None, threadline.wrap(actor_id))
        return plain, wrapped

    assert seen == ["t"]
    assert asyncio.run(main()) == (None, "e")


def test_asyncio_tasks_inherit_natively_and_stay_isolated() -> None:
    async def child(n: int) -> tuple[str | None, str | None]:
        inherited = actor_id()
        with threadline.context(actor=f"user:{n}"):
            await asyncio.sleep(0)
            return inherited, actor_id()

    async def main() -> None:
        with threadline.context(actor=ActorRef.user("parent"), correlation_id="c"):
            results = await asyncio.gather(*(child(n) for n in range(5)))
            assert results == [("parent", str(n)) for n in range(5)]
            assert actor_id() == "parent"
            assert await asyncio.to_thread(actor_id) == "parent"
            task = asyncio.create_task(child(9))
        assert threadline.current().is_empty
        assert await task == ("parent", "9")  # the task kept the context it was created under

    asyncio.run(main())


def test_submit_refuses_process_pools() -> None:
    with ProcessPoolExecutor(1) as pool, pytest.raises(ConfigurationError, match="from_json"):
        threadline.submit(pool, actor_id)
    text = AuditContext(actor=ActorRef.user("1")).to_json()
    assert AuditContext.from_json(text).actor == ActorRef.user("1")  # the documented way instead
