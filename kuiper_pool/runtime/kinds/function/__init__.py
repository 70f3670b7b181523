"""Functions: the supervisor dials eKuiper's function socket (``channel.py``) and relays
calls or lends the connection, enforcing call_deadline and answering owed calls
(``route.py``); the worker runs the calls (``serve.py``), noting each in its call page
(``page.py``) when it answers eKuiper itself."""
