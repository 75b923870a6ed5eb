"""The test project's app: one audited model."""
