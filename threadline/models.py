"""threadline defines no Django models (its tables are in the audit schema, managed by its
migrations); the module exists so that Django sends the app ``post_migrate``, which applies
``THREADLINE["TRACK"]``."""
