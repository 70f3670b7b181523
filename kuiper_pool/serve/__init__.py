"""``kuiper-pool serve``: a plugin's functions served as an eKuiper external service (REST),
each function symbol by a pool of supervised workers (docs/serve.md)."""
