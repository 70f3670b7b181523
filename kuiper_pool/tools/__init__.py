"""What an operator runs: the ``kuiper-pool`` CLI, the ``try`` rule runner, the eKuiper
stand-in (emulator), ``validate`` and ``package``. Nothing in the runtime imports these."""
