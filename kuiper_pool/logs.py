"""Logging to stdout (eKuiper captures it) with plugin, symbol, rule and pid on every line."""
from __future__ import annotations

import logging
import sys
from typing import Optional

FORMAT = ("%(asctime)s %(levelname)s kuiper_pool plugin=%(plugin)s symbol=%(symbol)s "
          "rule=%(rule)s pid=%(process)d: %(message)s")


class _Defaults(logging.Filter):
    """Give records that carry no instance fields the process-wide ones."""

    def __init__(self, plugin: str) -> None:
        super().__init__()
        self.plugin = plugin

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in (("plugin", self.plugin), ("symbol", "-"), ("rule", "-")):
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


class _Stamp(logging.Filter):
    """Stamp every record of one instance's logger with its symbol and rule."""

    def __init__(self, symbol: str, rule: str) -> None:
        super().__init__()
        self.symbol, self.rule = symbol, rule

    def filter(self, record: logging.LogRecord) -> bool:
        record.symbol, record.rule = self.symbol, self.rule
        return True


def setup(plugin: str, level: str = "INFO") -> None:
    """Route every record of this process to stdout in one format (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_kuiper_pool", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler._kuiper_pool = True  # type: ignore[attr-defined]
    handler.addFilter(_Defaults(plugin))
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)


def instance_logger(symbol: str, rule: Optional[str] = None, op: str = "", instance: int = 0) -> logging.Logger:
    """A real ``logging.Logger`` whose records name the symbol and rule."""
    rule_name = rule or "-"
    name = f"kuiper_pool.{symbol}" + (f".{rule}.{op}.{instance}" if rule else "")
    logger = logging.getLogger(name)
    if not any(isinstance(f, _Stamp) for f in logger.filters):
        logger.addFilter(_Stamp(symbol, rule_name))
    return logger


def supervisor_logger() -> logging.Logger:
    return logging.getLogger("kuiper_pool.runtime.supervisor")
