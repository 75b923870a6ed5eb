"""A small Django project for the tests: settings, a model, views, a Celery task using the ORM."""
