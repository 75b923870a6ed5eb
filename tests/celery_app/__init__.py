"""A Celery app and tasks used by the Celery tests, run by real ``celery worker`` processes."""
