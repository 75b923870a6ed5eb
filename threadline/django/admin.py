"""The Django admin: an object's audit trail, and one request's trace.

- :class:`AuditHistoryMixin` for the ``ModelAdmin`` of a tracked model: an "Audit trail" button
  on each object's change page, leading to its changes (time, actor, operation, each changed field
  with its old and new value, correlation id, origin, task), newest first.
- The "Audit trail" entry of the admin index (threadline's own ``admin.py`` registers it): search
  a correlation id, see its trace (the request, its tasks and their attempts, their transactions
  and changes).

Both need the ``threadline.view_audit_trail`` permission ("Can view the audit trail"), on top of
the view permission of the object's model for its history; a trace shows only the changes of
tables whose model the user may view (see :mod:`threadline.django.trace_access`). Values are shown as they were
captured: masked columns show the mask, excluded ones are absent.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db import connections, router
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.http import urlencode

from threadline.core.errors import InvalidFilter
from threadline.core.printable import printable_value
from threadline.django.trace_access import visible_trace
from threadline.explore.arguments import check_text_filter
from threadline.explore.diff import FieldChange, diff
from threadline.explore.query import history, trace

__all__ = ["PERMISSION", "AuditHistoryMixin", "AuditTrailAdmin"]

PERMISSION = "threadline.view_audit_trail"


def _audit_schema() -> str:
    from threadline.propagation.django import load_settings

    return load_settings().audit_schema


def _may_view(request: HttpRequest) -> bool:
    user: Any = request.user
    return bool(user.has_perm(PERMISSION))


def _trace_url(correlation_id: str | None, using: str) -> str | None:
    """The trace page of ``correlation_id`` in database ``using`` (named when it is not the
    database the trace page reads by default)."""
    if not correlation_id:
        return None
    url = reverse("admin:threadline_audittrail_trace", args=[correlation_id])
    from threadline.models import AuditTrail

    if using != router.db_for_read(AuditTrail):
        url += "?" + urlencode({"database": using})
    return url


class AuditHistoryMixin:
    """``ModelAdmin`` mixin: each object's audit trail, linked from its change page.

    The page lists the newest ``threadline_history_limit`` changes (default 200) and says when
    there are older ones (``manage.py threadline history`` lists them all).
    """

    change_form_template = "threadline/admin/change_form.html"
    threadline_history_limit = 200

    def get_urls(self) -> list[Any]:
        """The object's ``audit-trail/`` page before the admin's own URLs."""
        opts = self.model._meta  # type: ignore[attr-defined]
        view = self.admin_site.admin_view(self.audit_trail_view)  # type: ignore[attr-defined]
        ours = [
            path(
                "<path:object_id>/audit-trail/",
                view,
                name=f"{opts.app_label}_{opts.model_name}_audit_trail",
            )
        ]
        theirs: list[Any] = super().get_urls()  # type: ignore[misc]
        return ours + theirs

    def audit_trail_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The object's captured changes, newest first."""
        model = self.model  # type: ignore[attr-defined]
        obj = self.get_object(request, unquote(object_id))  # type: ignore[attr-defined]
        if obj is None:
            raise Http404(f"{model._meta.verbose_name} {object_id!r} does not exist")
        allowed = self.has_view_or_change_permission(request, obj)  # type: ignore[attr-defined]
        if not (allowed and _may_view(request)):
            raise PermissionDenied
        using = router.db_for_read(model, instance=obj)
        conn = connections[using]
        limit = self.threadline_history_limit
        changes = history(conn, model._meta.db_table, obj.pk, limit=limit + 1, audit_schema=_audit_schema())
        older = len(changes) > limit
        changes = changes[:limit]
        rows = []
        for change in changes:
            tx = change.transaction
            job = (tx.job if tx else None) or {}
            rows.append(
                {
                    "change": change,
                    "fields": [
                        FieldChange(f.field, printable_value(f.before), printable_value(f.after))
                        for f in diff(change)
                    ],
                    "actor": None if tx is None or tx.actor is None else str(tx.actor),
                    "correlation_id": None if tx is None else tx.correlation_id,
                    "trace_url": _trace_url(None if tx is None else tx.correlation_id, using),
                    "origin": None if tx is None else tx.origin,
                    "task": job.get("name"),
                    "context_error": None if tx is None else tx.context_error,
                }
            )
        context = {
            **self.admin_site.each_context(request),  # type: ignore[attr-defined]
            "title": f"Audit trail: {obj}",
            "opts": model._meta,
            "object": obj,
            "rows": rows,
            "table": model._meta.db_table,
            "older": older,
            "limit": limit,
        }
        return TemplateResponse(request, "threadline/admin/object_history.html", context)


class AuditTrailAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """The admin index's "Audit trail": find one correlation id's trace (at most
    ``threadline_max_changes`` changes listed per transaction)."""

    threadline_max_changes = 20

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Only with ``threadline.view_audit_trail``."""
        return _may_view(request)

    def has_module_permission(self, request: HttpRequest) -> bool:
        """Shown on the index only to who may use it."""
        return self.has_view_permission(request)

    def has_add_permission(self, request: HttpRequest) -> bool:
        """The audit trail is read-only."""
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """The audit trail is read-only."""
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """The audit trail is read-only."""
        return False

    def get_urls(self) -> list[Any]:
        """The search page and ``trace/<correlation id>/``, nothing else: the model has no table,
        so the admin's add, change, delete and history pages of an object do not exist (404)."""
        site = self.admin_site
        return [
            path(
                "trace/<path:correlation_id>/",
                site.admin_view(self.trace_view),
                name="threadline_audittrail_trace",
            ),
            path("", site.admin_view(self.changelist_view), name="threadline_audittrail_changelist"),
        ]

    def _search_page(self, request: HttpRequest, error: str | None = None) -> HttpResponse:
        """The search form; with ``error``, a 400 that says what was wrong with the id."""
        context = {
            **self.admin_site.each_context(request),
            "title": "Audit trail",
            "opts": self.model._meta,
            "error": error,
        }
        status = 200 if error is None else 400
        return TemplateResponse(request, "threadline/admin/trace_search.html", context, status=status)

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        """A search form: a correlation id leads to its trace."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        wanted = (request.GET.get("correlation_id") or "").strip()
        if not wanted:
            return self._search_page(request)
        try:
            checked = check_text_filter("correlation_id", wanted)
        except InvalidFilter as exc:
            return self._search_page(request, f"No trace: {exc}.")
        return HttpResponseRedirect(reverse("admin:threadline_audittrail_trace", args=[checked]))

    def trace_view(self, request: HttpRequest, correlation_id: str) -> HttpResponse:
        """Everything one correlation id caused, as a tree."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        using = request.GET.get("database") or router.db_for_read(self.model)
        if using not in connections:
            raise Http404(f"no database {using!r}")
        try:
            found = trace(connections[using], correlation_id, audit_schema=_audit_schema())
        except InvalidFilter as exc:
            return self._search_page(request, f"No trace: {exc}.")
        shown = visible_trace(request.user, found)
        # a story of thousands of changes stays a readable page: the first of each transaction
        # are listed, the count of the rest is shown
        context = {
            **self.admin_site.each_context(request),
            "title": f"Trace of {correlation_id}",
            "opts": self.model._meta,
            "trace": shown.trace,
            "hidden_changes": shown.hidden_changes,
            "hidden_actions": shown.hidden_actions,
            "correlation_id": correlation_id,
            "max_changes": self.threadline_max_changes,
        }
        return TemplateResponse(request, "threadline/admin/trace.html", context)
