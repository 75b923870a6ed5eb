"""Celery propagation benchmark: run with `make bench-celery` (or `python bench/celery_propagation.py`).

Prints a Markdown report. Three parts:

- In-process handler cost (µs per call, median of rounds): what threadline adds to one publish
  (the caller-side encoding check in ``send_task`` plus the ``before_task_publish`` receiver,
  measured around a stand-in ``send_task`` that only sends the signal), and to one task run
  (``task_prerun`` + ``task_postrun`` restoring and resetting the context).
- End to end: N trivial tasks (one Redis INCR each) published under a request context and run by
  a real ``celery worker`` (prefork, 2 processes), once with threadline installed on both ends and
  once without, in interleaved rounds (the order alternates); throughput ratio of the medians (and
  the median of each round's ratio to the round next to it), and the CPU time per task of the
  worker (main process and pool processes) and of the publishing loop (less sensitive to a busy
  machine than throughput).
- The size of a typical header (user actor, correlation id, request id; with and without a
  signature).

Brokers: ``$THREADLINE_BENCH_BROKER`` (default Redis at 127.0.0.1:6379, db 15). Knobs:
``BENCH_ROUNDS`` (default 7), ``BENCH_TASKS`` (default 1500).
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the package it measures: keep its folder off the import path.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import os
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import redis
from celery import Celery, signals

import threadline
from threadline import ActorRef, AuditContext
from threadline.core.context import _current, use_context
from threadline.propagation import celery as tc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._db import scratch_database

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("THREADLINE_BENCH_REDIS", "redis://127.0.0.1:6379/15")
BROKER_URL = os.environ.get("THREADLINE_BENCH_BROKER", REDIS_URL)
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "7"))
TASKS = int(os.environ.get("BENCH_TASKS", "1500"))
KEY = "benchmark-signing-key-0123456789"


def request_context() -> AuditContext:
    return AuditContext(
        actor=ActorRef.user("1234567"),
        correlation_id=str(uuid.uuid4()),
        request_id=str(uuid.uuid4()),
        origin="web",
    )


Cost = tuple[float, float]


def added_us(with_tl: Callable[[], None], without: Callable[[], None], n: int, rounds: int = 15) -> Cost:
    """CPU µs that threadline adds per call, as (median, best) over interleaved rounds.

    Each callable runs its n calls once per round; the order alternates between rounds, so a
    busy neighbour on the machine weighs on both sides alike. The median is of the per-round
    differences; "best" is the difference of each side's fastest round.
    """
    diffs, with_times, without_times = [], [], []
    for i in range(rounds):
        timings = {}
        for arm in (with_tl, without) if i % 2 == 0 else (without, with_tl):
            start = time.process_time()  # CPU time of this process: neighbours on the machine weigh less
            arm()
            timings[arm] = (time.process_time() - start) / n * 1e6
        diffs.append(timings[with_tl] - timings[without])
        with_times.append(timings[with_tl])
        without_times.append(timings[without])
    return statistics.median(diffs), min(with_times) - min(without_times)


# -- in-process handler cost -----------------------------------------------------------------------


def _stand_in_send_task(name: str, args: Any = None, task_id: str | None = None, **_: Any) -> None:
    """What the real send_task does around the publish signal is left out: only the signal."""
    headers = {"id": task_id or "6b3c5d1e-0000-4000-8000-000000000000", "task": name, "parent_id": None}
    signals.before_task_publish.send(sender=name, headers=headers, body=None, exchange="", routing_key="q")


def publish_costs(signing_keys: list[str] | None, n: int = 5000) -> dict[str, Cost]:
    """µs per publish that threadline adds: caller-side check and publish receiver."""
    bare = Celery("bare", set_as_current=False)
    bare.send_task = _stand_in_send_task
    app = Celery("bench", set_as_current=False)
    app.send_task = _stand_in_send_task  # install() wraps it like a real app's send_task
    tc.install(app, signing_keys=signing_keys)
    contexts = [request_context() for _ in range(n)]

    def loop(target: Celery, fresh: bool) -> Callable[[], None]:
        def run() -> None:
            if fresh:
                tc._installations[app].cache.clear()
            for ctx in contexts if fresh else contexts[:1] * n:
                token = _current.set(ctx)
                target.send_task("t", ())
                _current.reset(token)

        return run

    try:
        return {
            "same context (a request or task publishing several tasks)": added_us(
                loop(app, False), loop(bare, False), n
            ),
            "new context each time (one task per request)": added_us(loop(app, True), loop(bare, True), n),
        }
    finally:
        tc.uninstall(app)


@contextmanager
def worker_request(task: Any, header: Any, task_id: str | None = None) -> Iterator[None]:
    request: dict[str, Any] = {
        "id": task_id or str(uuid.uuid4()),
        "root_id": str(uuid.uuid4()),
        "parent_id": str(uuid.uuid4()),
        "retries": 0,
        "is_eager": False,
        "delivery_info": {},
    }
    if header is not None:
        request["threadline"] = header
    task.push_request(**request)
    try:
        yield
    finally:
        task.pop_request()


def _body() -> None:
    return None


def task_costs(n: int = 5000) -> dict[str, Cost]:
    """CPU µs per task run spent in threadline's task_prerun + task_postrun receivers (and, for
    the recorded variant, in writing the task-run rows: this process's side of the COPY)."""
    with scratch_database("threadline_bench_runs") as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            threadline.ddl.install(conn)
        return {
            "unsigned header": _task_cost(None, True, n),
            "signed header": _task_cost([KEY], True, n),
            "no header (beat, external producer)": _task_cost(None, False, n),
            "unsigned header, task runs recorded": _task_cost(None, True, n, record=dsn),
        }


def _noop_receiver(**_: Any) -> None:
    return None


def _run_signals(task: Any, n: int) -> None:
    for _ in range(n):
        signals.task_prerun.send(sender=task, task_id="x", task=task, args=(), kwargs={})
        signals.task_postrun.send(
            sender=task, task_id="x", task=task, args=(), kwargs={}, retval=None, state="SUCCESS"
        )


@contextmanager
def _noop_receivers() -> Iterator[None]:
    """One do-nothing receiver on each signal: Celery's own dispatch cost, paid by any receiver."""
    for sig in (signals.task_prerun, signals.task_postrun):
        sig.connect(_noop_receiver, weak=False, dispatch_uid="threadline-bench-noop")
    try:
        yield
    finally:
        for sig in (signals.task_prerun, signals.task_postrun):
            sig.disconnect(_noop_receiver, dispatch_uid="threadline-bench-noop")


def _task_cost(keys: list[str] | None, with_header: bool, n: int, record: str | None = None) -> Cost:
    app = Celery("bench-worker", set_as_current=False)
    threadline.task(app=app, name="bench.run")(_body)
    task = app.tasks["bench.run"]  # the task object itself, as Celery's signals pass it
    tc.install(app, signing_keys=keys, record_task_runs=record)
    task_id = str(uuid.uuid4())  # a signed header is bound to its message: the run's own id
    header = (
        tc._installations[app].header_for(request_context(), task_id, None, "bench.run")
        if with_header
        else None
    )

    def with_tl() -> None:
        if not tc.installed(app):
            tc.install(app, signing_keys=keys, record_task_runs=record)
        _run_signals(task, n)
        recorder = tc._installations[app].recorder
        if recorder is not None:  # write the rows now, so their cost falls in this arm
            assert recorder.flush()

    def without() -> None:
        tc.uninstall(app)
        with _noop_receivers():
            _run_signals(task, n)

    with worker_request(task, header, task_id):
        cost = added_us(with_tl, without, n)
    tc.uninstall(app)
    return cost


def signal_dispatch_cost(n: int = 5000) -> Cost:
    """CPU µs Celery spends dispatching task_prerun + task_postrun to one receiver each."""
    app = Celery("bench-dispatch", set_as_current=False)
    task = app.task(name="bench.run")(_body)
    task = app.tasks["bench.run"]

    def with_receivers() -> None:
        with _noop_receivers():
            _run_signals(task, n)

    with worker_request(task, None):
        return added_us(with_receivers, lambda: _run_signals(task, n), n)


def header_sizes() -> dict[str, int]:
    ctx = request_context()
    out = {}
    for label, keys in (("unsigned", None), ("signed", [KEY])):
        app = Celery("sizes", set_as_current=False)
        tc.install(app, signing_keys=keys)
        header = tc._installations[app].header_for(ctx, str(uuid.uuid4()), None)  # signed: bound to it
        out[label] = len(header.encode())
        tc.uninstall(app)
    return out


# -- end to end ------------------------------------------------------------------------------------


class BenchWorker:
    def __init__(self, installed: bool, log_dir: Path) -> None:
        self.queue = f"threadline-bench-{uuid.uuid4().hex[:8]}-{'on' if installed else 'off'}"
        self.installed = installed
        self.env = dict(
            os.environ,
            PYTHONPATH=str(ROOT),
            THREADLINE_BENCH_INSTALL="1" if installed else "0",
            THREADLINE_BENCH_BROKER=BROKER_URL,
            THREADLINE_BENCH_REDIS=REDIS_URL,
            THREADLINE_BENCH_QUEUE=self.queue,
        )
        self.log = log_dir / f"{self.queue}.log"
        args = [
            sys.executable, "-m", "celery", "-A", "bench.celery_worker_app", "worker", "-P", "prefork", "-c", "2",
            "-Q", self.queue, "-n", f"{self.queue}@%h", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "-l", "WARNING",
        ]  # fmt: skip
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                args, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.app = Celery("client", broker=BROKER_URL, set_as_current=False)
        self.app.conf.update(task_default_queue=self.queue, task_ignore_result=True)
        if installed:
            tc.install(self.app)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.installed:
            tc.uninstall(self.app)

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds used so far by the worker's main process and by its pool processes."""
        main = pool = 0.0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == self.proc.pid:  # process group id
                used = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                if int(stat.parent.name) == self.proc.pid:
                    main += used
                else:
                    pool += used
        return main, pool

    def run(self, counter: redis.Redis, n: int, timeout: float = 120) -> Round:
        """One round of ``n`` tasks, from the first publish to the last task done."""
        key = f"threadline-bench-{uuid.uuid4().hex}"
        main, pool = self.cpu_seconds()
        start = time.perf_counter()
        publisher = time.process_time()
        with use_context(request_context()):
            for _ in range(n):
                self.app.send_task("bench.noop", args=[key])
        publisher = time.process_time() - publisher
        while int(counter.get(key) or 0) < n:
            if time.perf_counter() - start > timeout:
                raise RuntimeError(f"worker did not finish {n} tasks; see {self.log}")
            time.sleep(0.002)
        elapsed = time.perf_counter() - start
        counter.delete(key)
        time.sleep(0.1)  # let the last acknowledgements be counted
        main_after, pool_after = self.cpu_seconds()
        return Round(
            rate=n / elapsed,
            worker_main=(main_after - main) / n * 1e6,
            worker_pool=(pool_after - pool) / n * 1e6,
            publisher=publisher / n * 1e6,
        )


@dataclass(frozen=True)
class Round:
    """One end-to-end round: tasks per second, and CPU µs per task in each process."""

    rate: float
    worker_main: float
    worker_pool: float
    publisher: float

    @property
    def worker(self) -> float:
        """CPU µs per task of the whole worker (main and pool processes)."""
        return self.worker_main + self.worker_pool


def end_to_end() -> tuple[list[Round], list[Round]]:
    """Rounds with threadline and without, interleaved (the order alternates)."""
    counter = redis.Redis.from_url(REDIS_URL)
    counter.ping()
    with tempfile.TemporaryDirectory() as tmp:
        on, off = BenchWorker(True, Path(tmp)), BenchWorker(False, Path(tmp))
        try:
            for worker in (on, off):  # warm up: workers started, connections made
                worker.run(counter, 200)
            with_tl: list[Round] = []
            without: list[Round] = []
            for i in range(ROUNDS):
                order = (on, off) if i % 2 == 0 else (off, on)
                for worker in order:
                    (with_tl if worker is on else without).append(worker.run(counter, TASKS))
            return with_tl, without
        finally:
            on.stop()
            off.stop()
            with on.app.connection_for_write() as conn:
                for worker in (on, off):
                    conn.default_channel.queue_delete(worker.queue)


def _row(label: str, values: list[float]) -> str:
    return f"| {label} | {statistics.median(values):.0f} | {', '.join(f'{x:.0f}' for x in values)} |"


def main() -> None:
    print(f"## Celery propagation (Python {sys.version.split()[0]}, {os.cpu_count()} cores)\n")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"Broker {BROKER_URL.split('@')[-1]}; machine load average at start {load}.\n")
    print(
        "### Handler cost in process (CPU µs per call, threadline minus no threadline, 15 interleaved rounds)\n"
    )
    print("| path | median µs | best µs |\n|---|---:|---:|")
    rows = [(f"publish, {label}", cost) for label, cost in publish_costs(None).items()]
    rows += [(f"signed publish, {label}", cost) for label, cost in publish_costs([KEY]).items()]
    rows += [
        (f"task run (prerun + postrun receivers), {label}", cost) for label, cost in task_costs().items()
    ]
    rows.append(
        (
            "Celery's own dispatch of prerun + postrun to one receiver (any library pays it)",
            signal_dispatch_cost(),
        )
    )
    for label, (median, best) in rows:
        print(f"| {label} | {median:.1f} | {best:.1f} |")
    sizes = header_sizes()
    print("\n### Typical header (user actor, correlation id and request id as UUIDs)\n")
    print(f"{sizes['unsigned']} bytes unsigned, {sizes['signed']} bytes signed.\n")
    with_tl, without = end_to_end()
    ratio = statistics.median(r.rate for r in with_tl) / statistics.median(r.rate for r in without)
    # each round with threadline against the round without it that ran next to it
    pairs = statistics.median(a.rate / b.rate for a, b in zip(with_tl, without, strict=True))
    print(
        f"### End to end ({TASKS} trivial tasks per round, {ROUNDS} interleaved rounds, "
        "prefork worker with 2 processes)\n"
    )
    print("| | median | rounds |\n|---|---:|---|")
    for label, rounds in (("without threadline", without), ("with threadline", with_tl)):
        print(_row(f"tasks/s {label}", [r.rate for r in rounds]))
    for label, rounds in (("without", without), ("with", with_tl)):
        print(_row(f"worker CPU µs per task, {label}", [r.worker for r in rounds]))
        print(_row(f"... of which pool processes, {label}", [r.worker_pool for r in rounds]))
        print(_row(f"publisher CPU µs per task, {label}", [r.publisher for r in rounds]))
    print(
        f"\nThroughput ratio with / without: **{ratio:.3f}** (median of the paired rounds' ratios {pairs:.3f})"
    )
    print(f"\nMachine load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}.")


if __name__ == "__main__":
    main()
