"""What plugin authors write against: the official SDK's classes, same names and signatures.

Classes written for the official SDK (subclasses of ``ekuiper.Source`` ...) work
unchanged: kuiper_pool only calls the methods, it never checks the base class.
"""
from __future__ import annotations

import logging
from abc import abstractmethod
from typing import Any, Callable, Dict, List, Mapping, Optional

from . import wire


class Context:
    """What a running symbol knows about its rule and how it talks back to eKuiper."""

    @abstractmethod
    def get_rule_id(self) -> str:
        """The rule this instance runs in."""

    @abstractmethod
    def get_op_id(self) -> str:
        """The operator within the rule."""

    @abstractmethod
    def get_instance_id(self) -> int:
        """The operator's instance (parallelism) number."""

    @abstractmethod
    def get_logger(self) -> logging.Logger:
        """A logger whose records name plugin, symbol, rule and pid."""

    @abstractmethod
    def emit(self, message: dict, meta: Optional[dict]) -> None:
        """Source: send one item to the stream."""

    @abstractmethod
    def emit_error(self, error: str) -> None:
        """Source: send an error item to the stream."""

    @abstractmethod
    def ack_ok(self) -> None:
        """Sink: the current item succeeded (only sent when the rule sets requireAck)."""

    @abstractmethod
    def ack_error(self, error: str) -> None:
        """Sink: the current item failed (only sent when the rule sets requireAck)."""

    # kuiper_pool only (the official SDK has no state): docs/api.md, "State"

    @abstractmethod
    def put_state(self, key: str, value: Any) -> None:
        """Keep ``value`` (anything JSON can encode, or bytes) under ``key`` for this instance
        (a function: for this rule) across worker crashes, recycles and reloads, and with
        ``state_dir`` across plugin restarts. TypeError for other values; ValueError beyond
        ``state_max_bytes``."""

    @abstractmethod
    def get_state(self, key: str, default: Any = None) -> Any:
        """The value last put under ``key`` (a fresh copy; bytes stay bytes), else ``default``."""

    @abstractmethod
    def delete_state(self, key: str) -> None:
        """Forget ``key`` (nothing happens if it is not there)."""


class Source:
    """A source symbol: ``open`` runs until ``close`` is called, emitting through the context."""

    @abstractmethod
    def configure(self, datasource: str, conf: dict) -> None:
        """Check and keep the configuration; raise to refuse the start."""

    @abstractmethod
    def open(self, ctx: Context) -> None:
        """Emit items until closed."""

    @abstractmethod
    def close(self, ctx: Context) -> None:
        """Stop ``open`` and release resources."""


class Sink:
    """A sink symbol: ``collect`` is called once per item eKuiper sends."""

    @abstractmethod
    def configure(self, conf: dict) -> None:
        """Check and keep the configuration; raise to refuse the start."""

    @abstractmethod
    def open(self, ctx: Context) -> None:
        """Prepare to receive items."""

    @abstractmethod
    def collect(self, ctx: Context, data: Any) -> None:
        """Handle one item (the bytes eKuiper's encoder produced)."""

    @abstractmethod
    def close(self, ctx: Context) -> None:
        """Release resources."""


class Function:
    """A function symbol; one worker per symbol serves every rule that calls it."""

    @abstractmethod
    def validate(self, args: List[Any]) -> str:
        """Return an error text for bad arguments, or an empty string."""

    @abstractmethod
    def exec(self, args: List[Any], ctx: Context) -> Any:
        """Compute the result (anything JSON can encode)."""

    @abstractmethod
    def is_aggregate(self) -> bool:
        """Whether the function aggregates."""


Factory = Callable[[], Any]


class PluginConfig:
    """The plugin's name and a zero-argument factory per symbol.

    ``settings`` (kuiper_pool only) overrides configuration keys in code, e.g.
    ``{"call_deadline": 2.0}``.
    """

    def __init__(self, name: str, sources: Mapping[str, Factory], sinks: Mapping[str, Factory],
                 functions: Mapping[str, Factory], settings: Optional[Dict[str, Any]] = None) -> None:
        self.name = name
        self.sources = dict(sources or {})
        self.sinks = dict(sinks or {})
        self.functions = dict(functions or {})
        self.settings = dict(settings or {})

    def symbol_names(self) -> List[str]:
        """Every source, sink and function symbol of the plugin."""
        return [*self.sources, *self.sinks, *self.functions]

    def get(self, plugin_type: str, symbol_name: str) -> Optional[Factory]:
        """The factory of a symbol, or None."""
        table = {wire.TYPE_SOURCE: self.sources, wire.TYPE_SINK: self.sinks,
                 wire.TYPE_FUNC: self.functions}.get(plugin_type, {})
        return table.get(symbol_name)

    @classmethod
    def adopt(cls, config: Any) -> "PluginConfig":
        """Accept our own config or the official SDK's (same attributes); explain what is wrong."""
        name = getattr(config, "name", None)
        if not isinstance(name, str) or not name or any(c in name for c in "/\\ \0"):
            raise ValueError(f"PluginConfig name must be a non-empty name without '/', spaces "
                             f"or NUL (got {name!r})")
        tables = {}
        for attr in ("sources", "sinks", "functions"):
            table = getattr(config, attr, None) or {}
            if not isinstance(table, Mapping):
                raise ValueError(f"plugin {name}: PluginConfig.{attr} must be a dict of "
                                 f"symbol name -> factory (got {type(table).__name__})")
            for symbol, factory in table.items():
                if not callable(factory):
                    raise ValueError(f"plugin {name}: {attr} symbol {symbol!r} needs a "
                                     f"zero-argument factory, got {type(factory).__name__}")
            tables[attr] = table
        if not any(tables.values()):
            raise ValueError(f"plugin {name}: PluginConfig declares no source, sink or function")
        return cls(name, tables["sources"], tables["sinks"], tables["functions"],
                   getattr(config, "settings", None))
