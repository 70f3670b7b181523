"""The version of kuiper_pool, kept here alone: ``pyproject.toml`` reads it (statically), and
every module that reports or compares it imports it from here, not from the package, whose
``__init__`` imports the runtime."""
__version__ = "0.3.0"
