"""Solo pool (one process, one thread for every task): no leak between tasks; a real beat process."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import threadline
from threadline import ActorRef

from .celery_app import tasks
from .celery_app.harness import Worker, env_var, setup_events_table, wait_row_list, wait_rows

DEFAULT = tasks.DEFAULT_ACTOR.to_dict()
BEAT = tasks.BEAT_ACTOR.to_dict()


@pytest.fixture(scope="module")
def celery_dsn(database: str) -> Iterator[str]:
    setup_events_table(database)
    with env_var(tasks.DSN_ENV, database):
        yield database


@pytest.fixture(scope="module", params=["redis", "amqp"])
def solo(
    request: pytest.FixtureRequest, celery_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    worker = Worker(request.param, "solo", celery_dsn, Path(tmp_path_factory.mktemp("celery")), concurrency=1)
    with worker.serving():
        yield worker


def test_no_leak_on_the_solo_pool(solo: Worker, celery_dsn: str) -> None:
    p = f"solo-{solo.broker_name}-{uuid.uuid4().hex[:8]}"
    bare_ids = []
    for i in range(3):
        with threadline.context(actor=ActorRef.user("7"), correlation_id=f"{p}-corr"):
            tasks.record.delay(f"{p}-{i}-ctx")
        bare_ids.append(solo.publish_raw(tasks.NAME + "record", [f"{p}-{i}-bare"]))
    rows = wait_rows(celery_dsn, p, 6, worker=solo)
    assert len({(r["pid"], r["thread"]) for r in rows.values()}) == 1  # truly one process and thread
    for i, task_id in enumerate(bare_ids):
        ctx_row, bare_row = rows[f"{p}-{i}-ctx"], rows[f"{p}-{i}-bare"]
        assert ctx_row["actor"] == {"type": "user", "id": "7"}
        assert bare_row["actor"] == DEFAULT, bare_row
        assert (bare_row["correlation_id"], bare_row["causation_id"]) == (task_id, None), bare_row
    shown = tasks.show_context.delay("x").get(timeout=30)
    assert shown["actor"] == DEFAULT and shown["correlation_id"] == shown["job"]["id"]
    # between tasks the worker's own context is empty again (checked after every task's postrun)
    assert "succeeded" in solo.log() and "context left behind" not in solo.log()


def test_real_beat_process_starts_one_story_per_run(solo: Worker, celery_dsn: str, tmp_path: Path) -> None:
    label = f"beat-{uuid.uuid4().hex[:8]}"
    beat = solo.start_beat(label, tmp_path)
    try:
        rows = wait_row_list(celery_dsn, label, 4, worker=solo)  # at least two ticks and their children
    finally:
        Worker.stop_process(beat)
    ticks = [r for r in rows if r["label"] == label]
    children = {r["causation_id"]: r for r in rows if r["label"] == f"{label}:child"}
    assert ticks
    for tick in ticks:
        tick_id = tick["job"]["id"]
        assert tick["actor"] == BEAT and tick["origin"] == "celery" and tick["context_error"] is None, tick
        assert (tick["correlation_id"], tick["causation_id"]) == (tick_id, None), tick
        assert tick["job"]["root_id"] == tick_id and tick["job"]["parent_id"] is None
        if tick_id in children:
            child = children[tick_id]
            assert child["actor"] == BEAT and child["correlation_id"] == tick_id, child
    assert set(children) <= {t["job"]["id"] for t in ticks}
    assert len({t["correlation_id"] for t in ticks}) == len(ticks)  # each run is its own story
