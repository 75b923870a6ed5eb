"""Carriers that move the audit context across boundaries (database, Celery, web, threads)."""
