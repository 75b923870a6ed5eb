"""ActorRef, AuditContext, the context manager/decorator and the canonical codec."""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading

import pytest

import threadline
from threadline import ActorRef, AuditContext, InvalidActor, InvalidContext
from threadline.core import codec
from threadline.core.context import current

DEEP: object = 1
for _ in range(20):
    DEEP = [DEEP]


def test_actor_constructors_parse_and_round_trip() -> None:
    assert ActorRef.user(42) == ActorRef("user", "42")
    assert ActorRef.system().to_dict() == {"type": "system", "id": "system"}
    assert ActorRef.anonymous().to_dict() == {"type": "anonymous"}
    assert ActorRef.parse("service_account:billing-api") == ActorRef.service_account("billing-api")
    assert ActorRef.parse("user:a:b").id == "a:b"
    assert ActorRef.parse("anonymous") == ActorRef.anonymous()
    assert ActorRef.parse("tenant_admin:7").type == "tenant_admin"  # app-defined type
    a = ActorRef.admin("9", display="Ada")
    assert ActorRef.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    assert str(ActorRef.user("42")) == "user:42"


@pytest.mark.parametrize(
    "build",
    [
        lambda: ActorRef("User", "1"),
        lambda: ActorRef("user"),
        lambda: ActorRef("user", ""),
        lambda: ActorRef("user", "x" * 257),
        lambda: ActorRef("user", "a\nb"),
        lambda: ActorRef("x" * 40, "1"),
        lambda: ActorRef.parse("nocolon"),
        lambda: ActorRef.from_dict({"type": "user", "id": "1", "role": "root"}),
        lambda: ActorRef.from_dict(["user", "1"]),
    ],
)
def test_actor_rejects_bad_input(build) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidActor):
        build()


def test_context_layers_and_restores_exactly() -> None:
    assert current().is_empty
    with threadline.context(actor=ActorRef.user("1"), correlation_id="req-1") as outer:
        assert current() is outer
        with threadline.context(actor="user:2", meta={"k": 1}):
            assert current().actor == ActorRef.user("2")
            assert current().correlation_id == "req-1"
            assert dict(current().meta or {}) == {"k": 1}
        assert current() is outer
        with pytest.raises(RuntimeError), threadline.context(correlation_id="other"):
            raise RuntimeError("boom")
        assert current() is outer
        with threadline.context(actor=None):
            assert current().actor is None and current().correlation_id == "req-1"
    assert current().is_empty


def test_context_is_a_decorator_for_sync_and_async_functions() -> None:
    @threadline.context(origin="cli")
    def sync_fn() -> str | None:
        return current().origin

    @threadline.context(origin="job")
    async def async_fn() -> str | None:
        await asyncio.sleep(0)
        return current().origin

    assert sync_fn() == "cli" and current().origin is None
    assert asyncio.run(async_fn()) == "job" and current().origin is None


def test_context_recursion_with_the_same_decorator() -> None:
    seen: list[str | None] = []

    @threadline.context(correlation_id="r")
    def rec(n: int) -> None:
        seen.append(current().correlation_id)
        if n:
            rec(n - 1)

    rec(3)
    assert seen == ["r"] * 4 and current().is_empty


def test_asyncio_tasks_each_keep_their_own_context() -> None:
    async def worker(i: int) -> str | None:
        with threadline.context(actor=ActorRef.user(i)):
            await asyncio.sleep(0.01 * (5 - i))
            return current().actor.id if current().actor else None

    async def main() -> list[str | None]:
        return list(await asyncio.gather(*(worker(i) for i in range(5))))

    assert asyncio.run(main()) == ["0", "1", "2", "3", "4"]


def test_threads_see_the_context_only_when_copied() -> None:
    results: dict[str, object] = {}
    with threadline.context(actor="user:5"):
        ctx = contextvars.copy_context()
        t1 = threading.Thread(target=lambda: results.__setitem__("plain", current().actor))
        t2 = threading.Thread(target=lambda: ctx.run(lambda: results.__setitem__("copied", current().actor)))
        t1.start(), t2.start()
        t1.join(), t2.join()
    assert results == {"plain": None, "copied": ActorRef.user("5")}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"correlation_id": "x" * 257}, "correlation_id"),
        ({"request_id": "a\r\nSet-Cookie: x"}, "request_id"),
        ({"causation_id": 12}, "causation_id"),
        ({"origin": ""}, "origin"),
        ({"meta": {"blob": "x" * 5000}}, "meta"),
        ({"meta": {"f": float("nan")}}, "meta"),
        ({"meta": {"o": object()}}, "meta"),
        ({"meta": {1: "non-string key"}}, "meta"),
        ({"meta": ["not", "a", "mapping"]}, "meta"),
        ({"job": {"deep": DEEP}}, "job"),
        ({"actor": 42}, "actor"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_invalid_fields_raise_invalid_context_naming_the_field(fields, field) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidContext) as info:
        threadline.context(**fields)
    assert info.value.field == field
    assert field in str(info.value)


def test_context_is_immutable_and_meta_is_read_only() -> None:
    ctx = AuditContext(meta={"a": [1, 2]})
    with pytest.raises(AttributeError):
        ctx.origin = "web"  # type: ignore[misc]
    with pytest.raises(TypeError):
        ctx.meta["a"] = 3  # type: ignore[index]


def test_codec_round_trip_is_canonical() -> None:
    ctx = AuditContext(
        actor=ActorRef.user("42"),
        correlation_id="req-1",
        request_id="r",
        causation_id="c",
        origin="web",
        job={"name": "t", "retries": 0},
        meta={"b": 1, "a": "é"},
    )
    text = ctx.to_json()
    assert text == codec.dumps(json.loads(text))  # sorted keys, compact
    assert json.loads(text)["v"] == 1
    assert AuditContext.from_json(text) == ctx
    assert AuditContext.from_json(text.encode()) == ctx
    assert AuditContext().to_json() == '{"v":1}'


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1]",
        '{"v":2}',
        '{"actor":{"type":"user","id":"1"}}',
        '{"v":true}',
        '{"v":1,"actor":{"type":"user"}}',
        '{"v":1,"correlation_id":5}',
        '{"v":1,"evil":1}',
        '{"v":1,"meta":{"x":NaN}}',
        '{"v":1,"meta":"' + "x" * 9000 + '"}',
        b"\xff\xfe",
    ],
)
def test_codec_rejects_malformed_input(text) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidContext):
        codec.decode(text)


def test_encoded_size_cap_and_limits_are_configurable() -> None:
    big = AuditContext(meta={"k" + str(i): "v" * 100 for i in range(30)})  # ~3.5 KiB: fits meta cap
    assert len(big.to_json()) < 8192
    old = codec.limits()
    try:
        codec.set_limits(max_meta_bytes=100)
        with pytest.raises(InvalidContext):
            AuditContext(meta={"x": "y" * 200})
        with pytest.raises(ValueError):
            codec.set_limits(max_meta_bytes=0)
    finally:
        codec.set_limits(**old.__dict__)


def test_nested_contexts_keep_job_and_meta_of_the_outer_one() -> None:
    with threadline.context(meta={"k": [1, {"n": 2}]}, job={"name": "t", "retries": 0}):
        with threadline.context(actor="user:1"):
            ctx = threadline.current()
            assert dict(ctx.meta or {}) == {"k": [1, {"n": 2}]} and ctx.job is not None
            assert ctx.to_json() == (
                '{"actor":{"id":"1","type":"user"},"job":{"name":"t","retries":0},"meta":{"k":[1,{"n":2}]},"v":1}'
            )
        merged = threadline.current().merged(request_id="r")
        assert merged.request_id == "r" and dict(merged.meta or {}) == {"k": [1, {"n": 2}]}


@pytest.mark.parametrize(
    "value",
    [
        "x\ud800",
        "\udfffy",
        "a\x85b",
        "abc\u202edef",
        "\u2066id",
        "id\u2069",
        "\x9f",
        "a\u2028b",
        "\u200eid",
        "\u061c",
    ],
    ids=[
        "lone-high",
        "lone-low",
        "c1-nel",
        "bidi-override",
        "bidi-isolate",
        "pop-isolate",
        "c1-last",
        "line-separator",
        "lrm",
        "alm",
    ],
)
def test_ids_refuse_c1_bidi_controls_and_lone_surrogates(value: str) -> None:
    with pytest.raises(InvalidContext, match="control characters or unpaired surrogates"):
        threadline.context(correlation_id=value)
    with pytest.raises(InvalidActor, match="control characters or unpaired surrogates"):
        ActorRef.user(value)
    with pytest.raises(InvalidContext):  # also when it arrives as JSON text
        codec.decode(json.dumps({"v": 1, "request_id": value}))


def test_meta_with_a_lone_surrogate_is_an_invalid_context_not_an_encoding_error() -> None:
    with pytest.raises(InvalidContext, match="unpaired surrogate"):
        threadline.context(meta={"note": "x\ud800"})
    with pytest.raises(InvalidContext, match="unpaired surrogate"):
        threadline.context(meta={"deep": [{"k": "\udc00"}]})
    with pytest.raises(InvalidContext):
        threadline.context(meta={"k\u202e": 1})
    # valid text beyond the BMP and ordinary Unicode stay accepted
    ok = threadline.context(correlation_id="é✓-😀", meta={"note": "line\nbreak 😀"})
    with ok as ctx:
        assert codec.decode(codec.encode(ctx)) == ctx


def test_a_header_carrying_a_receiver_only_field_is_refused() -> None:
    from threadline.propagation import carrier

    with pytest.raises(InvalidContext, match="not carried"):
        carrier.extract({"threadline": '{"actor":{"id":"1","type":"user"},"incoming_error":"x","v":1}'})
    with pytest.raises(InvalidContext, match="not carried"):
        carrier.extract({"threadline": '{"incoming_error":"x","origin":"web","v":1}'})
    # the header of a task that retries after its own was refused: why, beside its ids
    retry = carrier.extract(
        {"threadline": '{"correlation_id":"r-1","incoming_error":"header is not signed","v":1}'}
    )
    assert (retry.correlation_id, retry.actor, retry.incoming_error) == ("r-1", None, "header is not signed")
    with pytest.raises(InvalidContext):
        carrier.extract({"threadline": '{"correlation_id":"x\\ud800","v":1}'})


def test_a_header_actor_is_validated_whatever_was_decoded_before() -> None:
    from threadline.propagation import carrier

    good = carrier.extract({"threadline": '{"actor":{"display":null,"id":"7","type":"user"},"v":1}'})
    assert good.actor == ActorRef.user("7")
    for actor in (
        '{"type":"user","id":"7","x":"y"}',  # the same type and id as the one remembered
        '{"type":["user"],"id":"1"}',
        '{"type":"user","id":{"a":1}}',
        '{"type":"user","id":"1","display":["x"]}',
    ):
        with pytest.raises(InvalidContext):
            carrier.extract({"threadline": '{"actor":' + actor + ',"v":1}'})


def test_one_context_object_entered_by_concurrent_tasks_and_nested_in_itself() -> None:
    layer = threadline.context(actor=ActorRef.user("7"))

    async def worker(n: int, started: asyncio.Event, go: asyncio.Event) -> str | None:
        with threadline.context(correlation_id=f"c{n}"), layer:
            started.set()
            await go.wait()
            seen = current().correlation_id
        assert current().actor is None
        return seen

    async def main() -> list[str | None]:
        go = asyncio.Event()
        events = [asyncio.Event() for _ in range(3)]
        runs = [asyncio.create_task(worker(n, events[n], go)) for n in range(3)]
        for event in events:
            await event.wait()
        go.set()
        return list(await asyncio.gather(*runs))

    assert asyncio.run(main()) == ["c0", "c1", "c2"]
    with layer:
        with layer:  # nested in itself
            assert current().actor == ActorRef.user("7")
        assert current().actor == ActorRef.user("7")
    assert current().is_empty
    results: list[object] = []

    def in_thread() -> None:
        with layer:
            results.append(current().actor)
        results.append(current().actor)

    with layer:
        t = threading.Thread(target=in_thread)
        t.start()
        t.join()
        assert current().actor == ActorRef.user("7")
    assert results == [ActorRef.user("7"), None]
    with pytest.raises(RuntimeError, match="not entered"):
        layer.__exit__(None, None, None)
