"""`threadline timeline | history | trace | export | actions`, run as real subprocesses."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest

import threadline
from threadline.cli.connect import parse_when

from .story import Story


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("THREADLINE_DSN", "DATABASE_URL")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "threadline.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
    )


def ok(*args: str) -> str:
    res = run(*args)
    assert res.returncode == 0, (args, res.stdout, res.stderr)
    return res.stdout


def test_timeline_prints_an_aligned_table_and_pages(story: Story) -> None:
    out = ok("timeline", "--correlation-id", "req-1", "--dsn", story.dsn)
    lines = out.splitlines()
    assert lines[0].split() == [
        "CAPTURED",
        "(UTC)",
        "OP",
        "TABLE",
        "KEY",
        "ACTOR",
        "ORIGIN",
        "CORRELATION",
        "TX",
        "CHANGED",
    ]
    assert len(lines) == 10
    starts = {line.index("app.") for line in lines[1:]}
    assert len(starts) == 1  # the TABLE column is aligned
    assert "update  app.posts       id=1" in out and "title" in out
    assert "line_no=1,order_id=7" in out and "user:42" in out and "celery" in out

    first = ok("timeline", "--correlation-id", "req-1", "--limit", "4", "--dsn", story.dsn)
    assert "more: add --after " in first
    cursor = first.rsplit("--after ", 1)[1].strip()
    rest = ok("timeline", "--correlation-id", "req-1", "--after", cursor, "--dsn", story.dsn)
    assert len(rest.splitlines()) == 1 + 5 and "more:" not in rest


def test_timeline_filters_and_json(story: Story) -> None:
    data = json.loads(
        ok("timeline", "--table", "app.line_items", "--op", "update", "--json", "--dsn", story.dsn)
    )
    assert [c["pk"] for c in data["changes"]] == [{"order_id": 7, "line_no": 1}] and data[
        "next_cursor"
    ] is None
    assert data["changes"][0]["transaction"]["job"]["id"] == "task-c"
    by_7 = json.loads(
        ok("timeline", "--actor", "user:7", "--since", "1h", "--until", "now", "--json", "--dsn", story.dsn)
    )
    assert [c["transaction"]["correlation_id"] for c in by_7["changes"]] == ["req-2"]
    out = ok("timeline", "--correlation-id", "req-404", "--dsn", story.dsn)
    assert out == "no changes match these filters\n"
    future = ok("timeline", "--since", "2999-01-01", "--dsn", story.dsn)
    assert future.startswith("no changes match")


def test_history_as_of_and_composite_keys(story: Story) -> None:
    out = ok("history", "app.posts", "1", "--dsn", story.dsn)
    blocks = [line for line in out.splitlines() if not line.startswith(" ")]
    assert [b.split()[2] for b in blocks] == ["update", "update", "update", "insert"]
    assert "    body: first → edited" in out and "    title: Hello → Hello!" in out
    assert "correlation req-2" in out
    composite = ok("history", "line_items", "order_id=7,line_no=1", "--dsn", story.dsn)
    assert "    qty: 2 → 3" in composite
    as_json = json.loads(
        ok("history", "app.line_items", '{"order_id": 7, "line_no": 2}', "--json", "--dsn", story.dsn)
    )
    assert [c["op"] for c in as_json] == ["insert"]
    row = ok("history", "app.posts", "1", "--as-of", "now", "--dsn", story.dsn)
    assert "title   Hello!" in row and "views   1" in row
    assert (
        json.loads(ok("history", "app.posts", "1", "--as-of", "now", "--json", "--dsn", story.dsn))["row"][
            "body"
        ]
        == "edited"
    )
    gone = run("history", "app.posts", "2", "--as-of", "now", "--dsn", story.dsn)
    assert gone.returncode == 0 and "was deleted at" in gone.stdout
    early = run("history", "app.posts", "1", "--as-of", "2000-01-01T00:00:00Z", "--dsn", story.dsn)
    assert early.returncode == 0 and "did not exist yet" in early.stdout
    assert ok("history", "app.posts", "999", "--dsn", story.dsn) == "no captured changes for app.posts 999\n"


def test_trace_prints_the_tree(story: Story) -> None:
    out = ok("trace", "req-1", "--dsn", story.dsn)
    assert out.startswith("correlation req-1  5 transactions  9 changes  4 tasks")
    assert "└─ task posts.sync [task-a]  celery  user:42  2 attempts" in out
    assert "task (unknown name) [task-x]  (no audited writes)" in out
    tree = json.loads(ok("trace", "req-1", "--json", "--dsn", story.dsn))
    assert tree["roots"][0]["children"][0]["id"] == "task-a"
    short = ok("trace", "req-1", "--max-changes", "0", "--dsn", story.dsn)
    assert "… 4 more changes" in short and "insert app.posts" not in short
    assert ok("trace", "req-404", "--dsn", story.dsn) == "nothing recorded for correlation id req-404\n"


def test_export_to_files_and_stdout(story: Story, tmp_path: Path) -> None:
    target = tmp_path / "out.ndjson"
    res = run(
        "export",
        "--format",
        "ndjson",
        "--output",
        str(target),
        "--correlation-id",
        "req-1",
        "--dsn",
        story.dsn,
    )
    assert res.returncode == 0 and res.stdout == ""
    done, resume = res.stderr.splitlines()
    assert done == f"exported 9 changes as ndjson to {target}" and resume.startswith("resume: --after ")
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(rows) == 9 and rows[0]["correlation_id"] == "req-1"
    res = run("export", "--table", "app.comments", "--dsn", story.dsn)  # CSV to stdout by default
    table = list(csv.DictReader(io.StringIO(res.stdout)))
    assert res.returncode == 0 and [r["table_name"] for r in table] == ["comments"]
    doc = json.loads(ok("export", "--format", "json", "--actor", "user:7", "--dsn", story.dsn))
    assert len(doc["changes"]) == 1 and doc["filters"]["actor"] == "user:7"
    empty = run("export", "--correlation-id", "nope", "--format", "ndjson", "--dsn", story.dsn)
    assert empty.returncode == 0 and empty.stdout == "" and "no changes match these filters" in empty.stderr


def test_an_export_refused_for_a_bad_argument_leaves_the_output_file_as_it_was(
    story: Story, tmp_path: Path
) -> None:
    target = tmp_path / "earlier.csv"
    target.write_text("an earlier export\n")
    for bad in (
        ("--after", "garbage"),
        ("--table", "app.nope"),
        ("--since", "2024-02-01", "--until", "2024-01-01"),
    ):
        res = run("export", *bad, "--output", str(target), "--dsn", story.dsn)
        assert res.returncode == 2, res.stderr
        assert target.read_text() == "an earlier export\n"
    res = run(
        "export", "--format", "ndjson", "--correlation-id", "nope", "-o", str(target), "--dsn", story.dsn
    )
    assert res.returncode == 0 and target.read_text() == ""  # an empty export empties it


def test_export_with_a_cursor_file_writes_each_change_once(story: Story, tmp_path: Path) -> None:
    state = tmp_path / "export.cursor"
    args = ("export", "--format", "ndjson", "--correlation-id", "req-1", "--cursor-file", str(state))
    first = run(*args, "--dsn", story.dsn)
    assert first.returncode == 0 and len(first.stdout.splitlines()) == 9 and state.read_text().strip()
    late = psycopg.connect(story.dsn)  # committed only after the second run has read
    try:
        late.execute(
            "SELECT set_config('threadline.context', %s, true)",
            [json.dumps({"v": 1, "correlation_id": "req-1"})],
        )
        late.execute("INSERT INTO app.comments (id, post_id, body) VALUES (90, 1, 'late')")
        assert run(*args, "--dsn", story.dsn).stdout == ""
        late.commit()
    finally:
        late.close()
    third = run(*args, "--dsn", story.dsn)
    assert [json.loads(line)["pk"] for line in third.stdout.splitlines()] == [{"id": 90}]
    assert run(*args, "--dsn", story.dsn).stdout == ""
    both = run(*args, "--after", "x", "--dsn", story.dsn)
    assert both.returncode == 2 and "either --after or --cursor-file" in both.stderr
    state.write_text("garbage\n")
    bad = run(*args, "--dsn", story.dsn)
    assert bad.returncode == 2 and "cursor" in bad.stderr and state.read_text() == "garbage\n"


def test_actions_list(story: Story) -> None:
    out = ok("actions", "--correlation-id", "req-1", "--dsn", story.dsn)
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["RECORDED", "(UTC)", "NAME", "STATUS"]
    assert [line.split()[2] for line in lines[1:]] == ["post.publish", "sync.start"]
    assert "launch" in lines[1]
    data = json.loads(
        ok("actions", "--actor", "user:42", "--name", "sync.start", "--json", "--dsn", story.dsn)
    )
    assert [a["name"] for a in data] == ["sync.start"]
    assert ok("actions", "--actor", "user:404", "--dsn", story.dsn) == "no actions match these filters\n"
    # a list cut by its limit says so, and where the next page starts
    cut = run("actions", "--correlation-id", "req-1", "--limit", "1", "--dsn", story.dsn)
    assert cut.returncode == 0 and len(cut.stdout.splitlines()) == 2, cut.stdout
    after = cut.stderr.split("--after ")[1].split(",")[0]
    rest = ok("actions", "--correlation-id", "req-1", "--after", after, "--dsn", story.dsn)
    assert [line.split()[2] for line in rest.splitlines()[1:]] == ["sync.start"]
    gone = run("actions", "--after", str(2**62), "--dsn", story.dsn)
    assert gone.returncode == 2 and f"there is no action {2**62}" in gone.stderr, gone
    assert "more actions" not in run("actions", "--correlation-id", "req-1", "--dsn", story.dsn).stderr


def test_bad_arguments_exit_2_with_one_line(story: Story) -> None:
    dsn = story.dsn
    for args in (
        ("timeline", "--since", "yesterday-ish", "--dsn", dsn),
        ("timeline", "--actor", "nobody", "--dsn", dsn),
        ("timeline", "--limit", "0", "--dsn", dsn),
        ("timeline", "--op", "upsert", "--dsn", dsn),
        ("timeline", "--table", "app.nope", "--dsn", dsn),
        ("timeline", "--after", "garbage", "--dsn", dsn),
        ("timeline", "--since", "2024-02-01", "--until", "2024-01-01", "--dsn", dsn),
        ("timeline", "--audit-schema", "Bad Name", "--dsn", dsn),
        ("history", "app.posts", "{not json", "--dsn", dsn),
        ("history", "app.posts", "abc", "--dsn", dsn),
        ("history", "app.line_items", "7", "--dsn", dsn),
        ("history", "app.posts", "=1", "--dsn", dsn),
        ("history", "app.posts", "id=1,id=2", "--dsn", dsn),
        ("history", "app.posts", '{"id": 1, "id": 2}', "--dsn", dsn),
        ("history", "app.posts", "--dsn", dsn),
        ("export", "--format", "xml", "--dsn", dsn),
        ("export", "--output", "/nonexistent/dir/x.csv", "--dsn", dsn),
        ("trace", "", "--dsn", dsn),
        ("as-of", "app.nope", "--at", "now", "--dsn", dsn),
        ("as-of", "app.posts", "--at", "now", "--audit-schema", "Bad Name", "--dsn", dsn),
        ("actions", "--until", "soon", "--dsn", dsn),
        ("timeline",),  # no DSN anywhere
    ):
        res = run(*args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), (args, res.stderr)


def test_database_problems_exit_1(story: Story, conn: psycopg.Connection[Any]) -> None:
    res = run("timeline", "--audit-schema", "not_installed", "--dsn", story.dsn)
    assert res.returncode == 1 and "is not installed" in res.stderr
    res = run("trace", "x", "--dsn", "postgresql://postgres@127.0.0.1:1/nowhere?connect_timeout=2")
    assert res.returncode == 1 and res.stderr.startswith("Error: ") and "Hint:" in res.stderr


def test_parse_when() -> None:
    now = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
    assert parse_when("2h", now=now) == now - timedelta(hours=2)
    assert parse_when("90s", now=now) == now - timedelta(seconds=90)
    assert parse_when("1w", now=now) == now - timedelta(weeks=1)
    assert parse_when("now", now=now) == now
    assert parse_when("2024-05-01T10:00:00Z") == datetime(2024, 5, 1, 10, tzinfo=timezone.utc)
    assert parse_when("2024-05-01 10:00") == datetime(2024, 5, 1, 10, tzinfo=timezone.utc)  # no offset: UTC
    assert parse_when("2024-05-01T12:00:00+02:00") == datetime(2024, 5, 1, 10, tzinfo=timezone.utc)
    with pytest.raises(ValueError):
        parse_when("last tuesday")


HOSTILE = "ok\r\x1b[2K\x1b[8mforged\u202eevil\x07\x9b31m"


def test_captured_text_never_acts_on_the_terminal(
    dsn: str, conn: psycopg.Connection[Any], posts: str
) -> None:
    import threadline

    conn.execute("CREATE TABLE app.notes (k text PRIMARY KEY, body text)")
    threadline.ddl.track(conn, "app.notes")
    with threadline.context(actor="user:1", correlation_id="req-term"), threadline.transaction(conn):
        conn.execute("INSERT INTO app.notes VALUES (%s, %s)", [HOSTILE, "line1\nline2\ttab"])
        conn.execute("UPDATE app.notes SET body = %s", [HOSTILE])
    outputs = [
        ok("timeline", "--correlation-id", "req-term", "--dsn", dsn),
        ok("timeline", "--correlation-id", "req-term", "--json", "--dsn", dsn),
        ok("history", "app.notes", HOSTILE, "--dsn", dsn),
        ok("history", "app.notes", HOSTILE, "--as-of", "now", "--dsn", dsn),
        ok("trace", "req-term", "--dsn", dsn),
        run("revert", "--correlation-id", "req-term", "--dry-run", "--dsn", dsn).stdout,
    ]
    for out in outputs:
        assert "forged" in out
        assert not any(ch in out for ch in "\r\x1b\x07\x9b\u202e"), out
        assert "\\u001b[2K" in out
    assert "line1\\nline2\\ttab" in outputs[2]  # a value's line break stays within its line
    # names and free text hold line breaks too: a table, a column, an action's reason
    conn.execute('CREATE TABLE app."t\nrequest r-forged  web  admin:1" ("c\n    fake: x" int PRIMARY KEY)')
    threadline.ddl.track(conn, 'app."t\nrequest r-forged  web  admin:1"')
    with threadline.context(actor="user:1", correlation_id="req-nl"), threadline.transaction(conn):
        conn.execute('INSERT INTO app."t\nrequest r-forged  web  admin:1" VALUES (1)')
        threadline.record_action(conn, "note", reason="why\nrequest r-forged")
    for args in (("timeline", "--correlation-id", "req-nl"), ("trace", "req-nl")):
        out = ok(*args, "--dsn", dsn)
        assert not [
            line for line in out.splitlines() if line.lstrip("│├└─ ").startswith("request r-forged")
        ], out
    out = ok("history", 'app."t\nrequest r-forged  web  admin:1"', "1", "--dsn", dsn)
    assert "fake: x" in out and not [line for line in out.splitlines() if line.strip().startswith("fake")], (
        out
    )
    exported = json.loads(ok("export", "--correlation-id", "req-term", "--format", "json", "--dsn", dsn))
    assert [c["pk"]["k"] for c in exported["changes"]] == [HOSTILE, HOSTILE]  # exports keep every character


def test_trace_of_a_long_chain_of_tasks(conn: psycopg.Connection[Any], dsn: str, posts: str) -> None:
    # each step of a chain names the one before as its parent: the tree is as deep as the chain
    steps = 600
    for i in range(steps):
        job = {
            "name": "pipeline.step",
            "id": f"step-{i}",
            "retries": 0,
            "parent_id": f"step-{i - 1}" if i else None,
            "root_id": "step-0",
        }
        with (
            threadline.context(correlation_id="long-chain", origin="celery", job=job),
            threadline.transaction(conn),
        ):
            conn.execute("INSERT INTO app.posts (id) VALUES (%s)", [i])
    found = threadline.trace(conn, "long-chain")
    assert [node.id for node in found.walk()] == [f"step-{i}" for i in range(steps)]
    assert found.render(max_changes=0).count("task pipeline.step") == steps
    text = ok("trace", "long-chain", "--dsn", dsn)
    assert text.count("task pipeline.step") == steps and text.count("insert app.posts") == steps
    shown = ok("trace", "long-chain", "--json", "--dsn", dsn)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(limit + 4 * steps)  # json reads a nested value by recursion too
    try:
        tree = json.loads(shown)
    finally:
        sys.setrecursionlimit(limit)
    depth, node = 1, tree["roots"][0]
    while node["children"]:
        (node,) = node["children"]
        depth += 1
    assert (depth, node["id"], tree["change_count"]) == (steps, f"step-{steps - 1}", steps)
