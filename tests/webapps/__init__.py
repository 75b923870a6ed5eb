"""Apps, tasks and helpers for the web-entry and ORM-bridge tests."""
