"""Sources: the worker dials eKuiper's PULL socket and writes each item itself (``serve.py``);
the supervisor's half only counts (``route.py``)."""
