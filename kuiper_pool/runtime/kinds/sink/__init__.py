"""Sinks: the supervisor listens on eKuiper's data path and dials its ack path
(``channel.py``), windows, redelivers and forwards one ack per item (``route.py``); the
worker collects (``serve.py``), marking each collect in its collect mark (``marks.py``) and,
lent eKuiper's connections, each item in its item page (``page.py``)."""
