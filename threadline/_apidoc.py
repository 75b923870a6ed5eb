"""Renders ``docs/api.md``, the API reference, from the public names' signatures and docstrings.

``python -m threadline._apidoc > docs/api.md`` rewrites it; a test fails while the file differs
from what this renders, so the reference cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
from collections.abc import Iterator
from typing import Any

MODULES = (
    ("threadline", "Context, capture bridges and the query API: what `import threadline` offers."),
    ("threadline.ddl", "The audit schema and table tracking."),
    ("threadline.celery", "Celery propagation."),
    ("threadline.propagation.psycopg", "psycopg 3: connections and transactions that carry the context."),
    ("threadline.propagation.sqlalchemy", "SQLAlchemy: engines and sessions that carry the context."),
    ("threadline.propagation.web", "WSGI and ASGI middleware: a context per request."),
    ("threadline.ops.health", "Coverage: which tables are captured, and how much traffic has a context."),
    ("threadline.ops.observability", "Operational events (purge, coverage) for metrics."),
    ("threadline.ops.seal", "Tamper evidence: the seal chain and its verification."),
    ("threadline.ops.erasure", "Erasure of a person's identifiers or a row's values."),
    ("threadline.ops.partitions", "The partitioned audit store: its partitions, made ahead of time."),
    ("threadline.ops.partition_migration", "Moving a plain audit store to partitions, online."),
    ("threadline.ops.retention", "Retention: purging audit rows older than a cut-off."),
    ("threadline.otel", "OpenTelemetry span ids on audited transactions (the `otel` extra)."),
    ("threadline.django", "Django: the middleware."),
    ("threadline.django.operations", "Django migration operations."),
    ("threadline.django.admin", "The Django admin's audit trail."),
    ("threadline.django.drf", "Django REST framework."),
    ("threadline.django.auth", "The actor after authentication (Django)."),
)

_ADDRESS = re.compile(r" at 0x[0-9a-f]+")
_QUOTED_ANNOTATION = re.compile(r"(: |-> )'([^']*)'")


def _setup_django() -> None:
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            INSTALLED_APPS=[
                "django.contrib.admin",
                "django.contrib.auth",
                "django.contrib.contenttypes",
                "threadline",
            ],
            DATABASES={},
        )
    import django

    django.setup()


def _signature(obj: Any) -> str:
    try:
        text = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    text = _QUOTED_ANNOTATION.sub(r"\1\2", _ADDRESS.sub("", text))
    return text.replace("(self, ", "(").replace("(self)", "()").replace("(cls, ", "(").replace("(cls)", "()")


_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc):`~?([^`]+)`")


def _doc(obj: Any) -> str:
    """The docstring, its reStructuredText roles and literals as Markdown code."""
    doc = (inspect.getdoc(obj) or "").strip()
    return _ROLE.sub(r"`\1`", doc).replace("``", "`").replace("::\n", ":\n")


def _kind(obj: Any) -> str:
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if inspect.ismodule(obj):
        return "module"
    if callable(obj):
        return "function"
    return "constant"


def _members(cls: type) -> Iterator[tuple[str, Any]]:
    """The public methods and properties a class defines itself."""
    for name, value in vars(cls).items():
        if name.startswith("_") or name in ("model",):
            continue
        if isinstance(value, property) or inspect.isfunction(value) or isinstance(value, classmethod):
            yield name, value


def _render_object(module: str, name: str, obj: Any) -> list[str]:
    kind = _kind(obj)
    lines = []
    if kind in ("function",):
        lines.append(f"### `{module}.{name}{_signature(obj)}`")
    elif kind in ("class", "exception"):
        lines.append(f"### {kind} `{module}.{name}`")
    else:
        lines.append(f"### `{module}.{name}`")
    lines.append("")
    doc = _doc(obj) if kind != "constant" else ""
    if doc:
        lines.extend([doc, ""])
    if kind == "class":
        if dataclasses.is_dataclass(obj):
            fields = ", ".join(f"`{f.name}`" for f in dataclasses.fields(obj))
            lines.extend([f"Fields: {fields}.", ""])
        for member, value in _members(obj):
            target = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
            first = (_doc(target).splitlines() or [""])[0]
            signature = "" if isinstance(value, property) else _signature(target)
            lines.append(f"- `{member}{signature}`: {first}" if first else f"- `{member}{signature}`")
        if any(True for _ in _members(obj)):
            lines.append("")
    return lines


def render() -> str:
    """The whole reference, as Markdown."""
    _setup_django()
    out = [
        "# API reference",
        "",
        "Every public name, with its signature and documentation, rendered from the code",
        "(`python -m threadline._apidoc > docs/api.md`). Guides: [querying](querying.md),",
        "[capture](capture.md), [Celery](celery.md), [Django](django.md).",
        "",
    ]
    for module_name, summary in MODULES:
        module = importlib.import_module(module_name)
        out.extend([f"## `{module_name}`", "", summary, ""])
        for name in sorted(getattr(module, "__all__", ())):
            if name.startswith("__"):
                continue
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                out.extend([f"### `{module_name}.{name}`", "", (_doc(obj).splitlines() or [""])[0], ""])
                continue
            out.extend(_render_object(module_name, name, obj))
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
