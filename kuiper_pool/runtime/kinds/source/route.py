"""A source's data path: none in the supervisor. The worker dials eKuiper's PULL socket
and writes each item itself (README, "Data paths"); only its counts pass through here."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..base import Counts, Route

if TYPE_CHECKING:
    from ...effects import WorkerHandle


class SourceRoute(Route):
    """Counts what each worker emitted; a clean exit of ``open`` ends the instance."""

    def on_worker_gone(self, w: "WorkerHandle", how: str, cause: str) -> None:
        self.inst.items_in += w.vitals.processed
        self.inst.items_out += w.vitals.processed

    def ended(self, w: "WorkerHandle", status: int) -> bool:
        return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and not w.kill_reason

    def started_note(self) -> str:
        # said here rather than by the worker: a log call in each worker dirties ~140 KiB
        # of pages it shares with the zygote
        policy = self.inst.s.source_datasource
        datasource = self.inst.ctrl.source_datasource(policy)
        return f"; configure got datasource {datasource!r} (source_datasource: {policy})"

    def counts(self, w: "WorkerHandle") -> Counts:
        return w.vitals.processed, w.vitals.processed, 0
