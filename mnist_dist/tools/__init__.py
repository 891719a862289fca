"""Commands on a finished run directory: ``evaluate``, ``predict``, ``plot``, ``export``."""
