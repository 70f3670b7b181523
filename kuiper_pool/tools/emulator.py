"""An embedded eKuiper stand-in: the *host* side of the portable plugin protocol.

It does what eKuiper 2.x does (``internal/plugin/portable/runtime/*.go``), step by
step, so a plugin (ours or the official SDK's) can be driven without a Go server:

* the control channel is a REP socket listening on ``ipc:///tmp/plugin_<name>.ipc``;
  each command goes out as the *reply* to the plugin's pending request and the
  plugin's answer is its next request (answers starting with ``h`` are late
  handshakes: the command is sent again; ``ok`` is success, anything else an error);
* the plugin is started as ``[python, "-u", <executable>, '{"sendTimeout":1000}']``
  in the executable's folder and stopped with SIGKILL of that one process;
* every successful ``start`` is recorded under its meta (rule, op, instance) and
  replayed, concurrently, when the plugin process is started again. Function
  starts all carry an empty meta, so only the last one survives, as in eKuiper.

Every socket the host opens is closed again by :meth:`Host.close`, which removes
its ``/tmp/*.ipc`` file. All receives use short timeouts in a loop (a blocking
pynng ``recv`` cannot be interrupted), checking that the plugin is still alive.

The data sockets of sources and sinks and the function channels are spoken natively by
default, the way eKuiper's Go host (mangos) does: a source's PULL listener reads whole
batches of frames, and a sink's PUSH dialer writes one frame per write and waits while the
socket is full, so the host side keeps up with a plugin at several hundred thousand messages
per second (pynng caps near 30-45k), and closing one never blocks. ``Host(data_transport="nng")``
uses pynng sockets instead (an independent nng peer, for tests that mean nng). The control
channel is pynng either way. A pynng socket is closed with a bound (:func:`_close`):
``nng_close`` can block for good inside C, where no timeout reaches it.
"""
from __future__ import annotations

import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import pynng

from .. import paths
from ..wire import PORTABLE_CONF
from ..runtime.zygote import signal_text
from ..transport import TransportError, TransportTimeout, sp

__all__ = ["HostError", "Host", "SourceHandle", "SinkHandle", "FunctionHandle", "go_json"]

SEND_TIMEOUT = 5.0  # portable.sendTimeout default: sink data push and function replies
_SLICE_MS = 100  # every host socket receives in slices of this many ms
DATA_TRANSPORTS = ("nng", "sp")
CLOSE_TIMEOUT = 5.0  # longest the host waits for a pynng socket to close (see _close)
log = logging.getLogger(__name__)

MetaKey = Tuple[str, str, int]


class HostError(Exception):
    """An error answer from the plugin, or a timeout. ``str()`` is one line;
    ``answer`` keeps the full text (e.g. a whole traceback)."""

    def __init__(self, message: str, answer: Optional[str] = None):
        self.answer = message if answer is None else answer
        super().__init__(_one_line(message))


class FolderError(HostError):
    """The plugin folder cannot be run as given: no folder, no usable plugin json, no
    executable. The user's to fix, not the plugin's."""


class InUseError(HostError):
    """An ipc path eKuiper's protocol prescribes is served by another process."""


def exit_text(code: int) -> str:
    """A Popen return code in words: ``exited with code 3``, ``killed by signal 9 (SIGKILL)``."""
    return f"killed by {signal_text(-code)}" if code < 0 else f"exited with code {code}"


def _one_line(text: str) -> str:
    """A traceback's last line, or the text with line breaks folded."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    if not lines:
        return "(empty answer)"
    line = lines[-1] if lines[0].startswith("Traceback") else " | ".join(lines)
    return line if len(line) <= 500 else line[:497] + "..."


def go_json(obj: Any) -> bytes:
    """JSON the way Go's ``encoding/json`` writes it: compact, UTF-8, HTML-escaped.
    (Go sorts map keys but keeps struct field order; callers pass dicts in the
    right order and sort map-typed parts with :func:`_sorted_maps`.)"""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text.encode("utf-8")


def _sorted_maps(value: Any) -> Any:
    """Sort the keys of every dict inside ``value`` (Go marshals maps sorted)."""
    if isinstance(value, dict):
        return {k: _sorted_maps(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_sorted_maps(v) for v in value]
    return value


def control(symbol: str, plugin_type: str, rule: str = "", op: str = "", instance: int = 0,
            datasource: str = "", config: Optional[dict] = None) -> dict:
    """The Control struct eKuiper sends (field order as in shared.go; empty
    ``dataSource`` and ``config`` are omitted)."""
    ctrl: Dict[str, Any] = {"symbolName": symbol,
                            "meta": {"ruleId": rule, "opId": op, "instanceId": instance},
                            "pluginType": plugin_type}
    if datasource:
        ctrl["dataSource"] = datasource
    if config:
        ctrl["config"] = _sorted_maps(config)
    return ctrl


def _meta_key(ctrl: dict) -> MetaKey:
    meta = ctrl.get("meta") or {}
    return (meta.get("ruleId", ""), meta.get("opId", ""), meta.get("instanceId", 0))


def _find_plugin_json(plugin_dir: str) -> Tuple[str, dict]:
    """The plugin json as ``kuiper-pool validate`` finds and reads it (one reader for both)."""
    from .validate import Checks, find_plugin_json

    if not os.path.exists(plugin_dir):
        raise FolderError(f"plugin folder {plugin_dir} does not exist")
    if not os.path.isdir(plugin_dir):
        raise FolderError(f"{plugin_dir} is a file, not a plugin folder (give the folder that "
                          f"holds <name>.json and the executable)")
    checks = Checks()
    name, meta = find_plugin_json(plugin_dir, checks)
    if meta is None:
        text = "; ".join(f.text for f in checks.problems)
        raise FolderError(text if plugin_dir in text else f"{text} (in {plugin_dir})")
    if "executable" not in meta:
        raise FolderError(f"{name}.json in {plugin_dir} names no executable")
    return name, meta


class Host:
    """One plugin as eKuiper's plugin instance manager sees it."""

    def __init__(self, plugin_dir: str, *, python: str = sys.executable, init_timeout: float = 60.0,
                 recv_timeout: float = 5.0, env: Optional[dict] = None, stdout=None,
                 command_timeout: float = 30.0, data_transport: str = "sp", own_session: bool = False):
        """``data_transport``: ``"sp"`` (native, mangos-like) or ``"nng"`` (pynng sockets)
        for the data and ack sockets of sources and sinks and the function channels.
        ``own_session``: the plugin gets a session of its own, so a terminal's Ctrl-C reaches
        only the caller, which then stops the plugin in order."""
        if data_transport not in DATA_TRANSPORTS:
            raise HostError(f"data_transport must be one of {DATA_TRANSPORTS}, got {data_transport!r}")
        self.data_transport = data_transport
        self.plugin_dir = os.path.abspath(plugin_dir)
        self.name, self.meta = _find_plugin_json(self.plugin_dir)
        self.executable = os.path.normpath(os.path.join(self.plugin_dir, str(self.meta["executable"])))
        if not os.path.isfile(self.executable):
            raise FolderError(f"cannot find executable `{self.executable}` of plugin {self.name}")
        self.python = python
        self.init_timeout = init_timeout
        self.recv_timeout = recv_timeout
        self.command_timeout = command_timeout  # eKuiper waits up to 1 h for an answer
        self.env = env
        self.stdout = stdout
        self.own_session = own_session
        self.process: Optional[subprocess.Popen] = None
        self.handshake_seconds: Optional[float] = None  # last start: Popen -> handshake received
        self.control_url = f"ipc:///tmp/plugin_{self.name}.ipc"
        self._ctrl: Optional[pynng.Socket] = None
        self._cmd_lock = threading.Lock()  # eKuiper's control channel mutex
        self._lock = threading.Lock()  # commands map and handle list
        self._commands: Dict[MetaKey, bytes] = {}
        self._handles: List[Union["SourceHandle", "SinkHandle", "FunctionHandle"]] = []
        self._closed = False

    # --- process ---------------------------------------------------------------------

    def argv(self) -> List[str]:
        """The command line eKuiper builds for this plugin."""
        lang = self.meta.get("language")
        if lang == "go":
            return [self.executable, PORTABLE_CONF]
        if lang != "python":
            raise HostError(f"unsupported language: {lang}")
        venv = self.meta.get("virtualEnvType")
        if venv is not None:
            if venv != "conda":
                raise HostError(f"unsupported virtual type: {venv}")
            return ["conda", "run", "-n", str(self.meta.get("env")), self.python,
                    self.executable, PORTABLE_CONF]
        return [self.python, "-u", self.executable, PORTABLE_CONF]

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """eKuiper's GetOrStartProcess: no-op while the plugin runs; otherwise create
        the control channel (once), exec the plugin, wait for its handshake and
        replay every recorded start command."""
        if self._closed:
            raise HostError("host is closed")
        if self.alive():
            return
        if self._ctrl is None:
            try:
                self._ctrl = _listen(pynng.Rep0(recv_timeout=_SLICE_MS,
                                                send_timeout=int(SEND_TIMEOUT * 1000)), self.control_url)
            except InUseError:
                raise InUseError(f"plugin {self.name} is already being served: another `kuiper-pool "
                                 f"try` or eKuiper listens on {sp.path_of(self.control_url)} (stop "
                                 f"it first)") from None
        env = None if self.env is None else {**os.environ, **self.env}
        t0 = time.perf_counter()
        try:
            self.process = subprocess.Popen(
                self.argv(), cwd=os.path.dirname(self.executable), env=env, stdout=self.stdout,
                stderr=None if self.stdout is None else subprocess.STDOUT,
                start_new_session=self.own_session)
        except OSError as e:
            raise HostError(f"fail to start plugin {self.name}: {e}") from e
        try:
            self._handshake()
        except BaseException:
            self.kill()
            raise
        self.handshake_seconds = time.perf_counter() - t0
        self._replay()

    def _handshake(self) -> None:
        deadline = time.monotonic() + self.init_timeout
        while True:
            try:
                self._ctrl.recv()  # whatever arrives first counts (eKuiper does not look)
                return
            except pynng.Timeout:
                pass
            if not self.alive():
                raise HostError(f"plugin {self.name} {exit_text(self.process.returncode)} "
                                "before the handshake")
            if time.monotonic() >= deadline:
                raise HostError(f"plugin {self.name} control handshake timed out after "
                                f"{self.init_timeout:g} s (nothing on {self.control_url})")

    def _replay(self) -> None:
        """Re-send every recorded start command, concurrently, like eKuiper does after a restart."""
        with self._lock:
            commands = list(self._commands.items())
        errors: List[str] = []

        def send(key: MetaKey, payload: bytes) -> None:
            try:
                answer = self._send_cmd(payload)
                if answer != "ok":
                    errors.append(f"{key}: {_one_line(answer)}")
            except HostError as e:
                errors.append(f"{key}: {e}")

        threads = [threading.Thread(target=send, args=c, daemon=True) for c in commands]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise HostError(f"replaying start commands of plugin {self.name} failed: " + "; ".join(errors))

    def restart_plugin(self) -> None:
        """SIGKILL the plugin, start it again, wait for the handshake, replay the starts."""
        self.kill()
        self.start()

    def kill(self) -> None:
        """SIGKILL of the plugin process only (as eKuiper), then reap it."""
        p = self.process
        if p is None:
            return
        if p.poll() is None:
            try:
                p.kill()
            except ProcessLookupError:
                pass
        p.wait()

    def _exit_text(self) -> Optional[str]:
        if self.process is None:
            return f"plugin {self.name} is not running"
        code = self.process.poll()
        return None if code is None else f"plugin {self.name} {exit_text(code)}"

    # --- control channel -------------------------------------------------------------

    def _recv(self, sock: Union[pynng.Socket, "NativePull"], timeout: float,
              timeout_text: Callable[[], str]) -> bytes:
        """Receive within ``timeout`` seconds; HostError when the plugin dies or time is up."""
        deadline = time.monotonic() + timeout
        while True:
            data = _take(sock)
            if data is not None:
                return data
            dead = self._exit_text()
            if dead:
                raise HostError(dead)
            if time.monotonic() >= deadline:
                raise HostError(timeout_text())

    def _rep_request(self, sock: pynng.Socket, payload: bytes, timeout: float,
                     timeout_text: Callable[[], str]) -> bytes:
        """Send a request on an inverted REP socket the way connection.go does:
        on a protocol-state error first take (and drop) the pending message, and
        send again whenever the answer is a (late) handshake."""
        while True:
            try:
                sock.send(payload)
            except pynng.BadState:  # mangos.ErrProtoState: no request pending
                self._recv(sock, timeout, timeout_text)  # "discard previous response"
                sock.send(payload)
            except pynng.Timeout as e:
                raise HostError(timeout_text()) from e
            result = self._recv(sock, timeout, timeout_text)
            if result[:1] == b"h":
                continue
            return result

    def _send_cmd(self, payload: bytes, timeout: Optional[float] = None) -> str:
        if self._ctrl is None:
            raise HostError(f"plugin {self.name} is not started")
        t = self.command_timeout if timeout is None else timeout
        with self._cmd_lock:
            answer = self._rep_request(self._ctrl, payload, t,
                                       lambda: f"no answer from plugin {self.name} within {t:g} s")
        return answer.decode("utf-8", "replace")

    def send_raw(self, payload: bytes) -> str:
        """Send arbitrary bytes as a command; return the answer text."""
        self.start()
        return self._send_cmd(payload)

    def command(self, cmd: str, ctrl: dict, timeout: Optional[float] = None) -> None:
        """Send ``start``/``stop`` with a Control; HostError(answer) unless ``ok``.
        A successful start is recorded under its meta, a successful stop removes it."""
        payload = go_json({"cmd": cmd, "arg": go_json(ctrl).decode("utf-8")})
        answer = self._send_cmd(payload, timeout)
        if answer != "ok":
            raise HostError(answer)
        with self._lock:
            if cmd == "start":
                self._commands[_meta_key(ctrl)] = payload
            elif cmd == "stop":
                self._commands.pop(_meta_key(ctrl), None)

    @property
    def commands(self) -> Dict[MetaKey, dict]:
        """The recorded (active) start commands, decoded, keyed by meta."""
        with self._lock:
            items = list(self._commands.items())
        decoded = {}
        for key, payload in items:
            cmd = json.loads(payload)
            decoded[key] = {"cmd": cmd["cmd"], "arg": json.loads(cmd["arg"])}
        return decoded

    def _stop_symbol(self, ctrl: dict, timeout: Optional[float] = None) -> None:
        """StopSymbol after the handle closed its sockets. Skipped when the plugin is
        dead (eKuiper would block on the control channel instead)."""
        if self.alive():
            self.command("stop", ctrl, timeout)
        else:
            with self._lock:
                self._commands.pop(_meta_key(ctrl), None)

    # --- symbols ---------------------------------------------------------------------

    def _add(self, handle):
        with self._lock:
            self._handles.append(handle)
        return handle

    def _forget(self, handle) -> None:
        with self._lock:
            if handle in self._handles:
                self._handles.remove(handle)

    def start_source(self, symbol: str, rule: str, op: str = "op", instance: int = 0,
                     datasource: str = "", config: Optional[dict] = None) -> "SourceHandle":
        """PortableSource.Connect: listen for data, then send start."""
        self.start()
        ctrl = control(symbol, "source", rule, op, instance, datasource, config)
        url = f"ipc:///tmp/{rule}_{op}_{instance}.ipc"
        sock = self._listen_pull(url)
        try:
            self.command("start", ctrl)
        except BaseException:
            _close(sock, url)
            raise
        return self._add(SourceHandle(self, ctrl, sock, url))

    def start_sink(self, symbol: str, rule: str, op: str = "op", instance: int = 0,
                   config: Optional[dict] = None, require_ack: bool = False) -> "SinkHandle":
        """PortableSink.Connect: listen for acks, send start, then dial the data path
        synchronously (fails when the plugin does not listen yet)."""
        self.start()
        config = dict(config or {})
        if require_ack:
            config["requireAck"] = True
        require_ack = bool(config.get("requireAck", False))
        ctrl = control(symbol, "sink", rule, op, instance, config=config)
        base = f"ipc:///tmp/{rule}_{op}_{instance}"
        ack = self._listen_pull(base + "_ack.ipc")
        try:
            self.command("start", ctrl)
        except BaseException:
            _close(ack, base + "_ack.ipc")  # eKuiper leaves it open; we close every socket we open
            raise
        try:
            data = self._dial_push(base + ".ipc")
        except (pynng.NNGException, TransportError) as e:
            _close(ack, base + "_ack.ipc")
            try:
                self._stop_symbol(ctrl)
            except HostError:
                pass
            raise HostError(f"can't dial on push socket: {e}") from e
        return self._add(SinkHandle(self, ctrl, data, ack, base + ".ipc", require_ack))

    def _listen_pull(self, url: str) -> Union[pynng.Socket, "NativePull"]:
        """eKuiper's PULL listener (source data, sink acks) in this host's data transport."""
        if self.data_transport == "nng":
            return _listen(pynng.Pull0(recv_timeout=_SLICE_MS), url)
        return _retry_listen(url, lambda: NativePull(url))

    def _dial_push(self, url: str) -> Union[pynng.Socket, sp.PushEndpoint]:
        """eKuiper's sink PUSH dialer, dialed once synchronously (fails when nobody listens);
        later losses are redialed (100 ms doubling to 5 s)."""
        if self.data_transport == "sp":
            push = sp.PushEndpoint(url, dial_timeout=0, send_timeout=SEND_TIMEOUT)
            if push.sock is None:  # the one attempt failed: mangos's Dial returns the error
                push.close()
                raise TransportError(f"{url}: nothing listens")
            return push
        data = pynng.Push0(send_timeout=int(SEND_TIMEOUT * 1000))
        data.recv_max_size = 0
        data.reconnect_time_min, data.reconnect_time_max = 100, 5000
        try:
            data.dial(url, block=True)
        except pynng.NNGException:
            data.close()
            raise
        return data

    def start_function(self, symbol: str) -> "FunctionHandle":
        """NewPortableFunc: listen on the function channel, then send start (empty meta)."""
        self.start()
        url = f"ipc:///tmp/func_{symbol}.ipc"
        try:
            sock: Any = (NativeRep(url) if self.data_transport == "sp" else
                         _listen(pynng.Rep0(recv_timeout=_SLICE_MS, send_timeout=int(SEND_TIMEOUT * 1000)),
                                 url))
        except (HostError, TransportError) as e:
            if not _in_use(e):
                raise
            raise InUseError(f"function {symbol}: {sp.path_of(url)} is in use: another plugin with a "
                             f"function named {symbol} is running (eKuiper names a function's "
                             f"socket after its symbol alone, so function names must differ "
                             f"across plugins)") from None
        try:
            self.command("start", control(symbol, "func"))
        except BaseException:
            _close(sock, url)
            raise
        return self._add(FunctionHandle(self, symbol, sock, url))

    # --- teardown --------------------------------------------------------------------

    def close(self) -> None:
        """Stop every active handle (close sockets, then send stop), kill the plugin,
        close the control channel. Idempotent; errors while stopping are ignored."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            handles = list(reversed(self._handles))
        for h in handles:
            try:
                if isinstance(h, FunctionHandle):
                    h.close()
                else:
                    h.stop(timeout=min(self.command_timeout, 5.0))
            except HostError:
                pass
        self.kill()
        if self._ctrl is not None:
            _close(self._ctrl, self.control_url)
            self._ctrl = None

    def __enter__(self) -> "Host":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _retry_listen(url: str, listen: Callable[[], Any]) -> Any:
    """listenWithRetry: ``listen()`` with up to 5 retries 100 ms apart."""
    for attempt in range(6):
        try:
            return listen()
        except (pynng.NNGException, TransportError) as e:
            err = e
            if attempt < 5:
                time.sleep(0.1)
    raise (InUseError if _in_use(err) else HostError)(f"can't listen on {url}: {err}")


def _in_use(e: BaseException) -> bool:
    """Someone else listens there (nng's and our SP listener's ways of saying so)."""
    return isinstance(e, (pynng.AddressInUse, InUseError)) or "address in use" in str(e).lower()


def _listen(sock: pynng.Socket, url: str) -> pynng.Socket:
    """listenWithRetry on a pynng socket; the socket is closed on failure."""
    sock.recv_max_size = 0
    try:
        _retry_listen(url, lambda: sock.listen(url))
    except HostError:
        sock.close()
        raise
    return sock


def _take(sock: Union[pynng.Socket, "NativePull"]) -> Optional[bytes]:
    """One message, waiting at most one slice; None when nothing came in it."""
    try:
        if isinstance(sock, NativePull):
            msgs = sock.recv_many(1)
            if not msgs:
                sock.wait(_SLICE_MS / 1000)
                msgs = sock.recv_many(1)
            return msgs[0] if msgs else None
        return sock.recv()
    except pynng.Timeout:
        return None
    except (pynng.Closed, OSError, ValueError) as e:  # closed by another thread
        raise HostError("socket closed") from e


def _close(sock: Any, what: str, timeout: float = CLOSE_TIMEOUT) -> bool:
    """Close a host socket; a pynng one without blocking for good. ``nng_close`` waits for
    the socket's pipes and callbacks, and a blocked C call cannot be interrupted (not even by
    a test timeout): the close runs in a daemon thread, and after ``timeout`` seconds the
    socket is left to that thread, with a warning. Returns whether the close finished."""
    if not isinstance(sock, pynng.Socket):
        sock.close()  # native sockets close at once
        return True
    closer = threading.Thread(target=sock.close, daemon=True, name=f"close {what}")
    closer.start()
    closer.join(timeout)
    if closer.is_alive():
        log.warning("emulator: closing the pynng socket of %s did not finish within %g s "
                    "(nng_close is blocked); leaking it to a background thread", what, timeout)
        return False
    return True


class NativeRep:
    """eKuiper's function REP socket spoken natively, with mangos REP semantics: a thread
    accepts pipes at once (the plugin waits for the listener's header); ``recv`` takes the
    next request from any pipe and remembers its pipe and id; ``send`` replies to that pipe
    (dropped without error if it has closed) and raises :class:`HostError` when no request
    is pending (mangos's ErrProtoState)."""

    def __init__(self, url: str) -> None:
        self.path = sp.path_of(url)
        self.listener, self.ident = sp.listen(self.path)
        self.listener.setblocking(True)
        self.listener.settimeout(_SLICE_MS / 1000)
        self._pipes: Dict[socket.socket, sp.FrameReader] = {}
        self._lock = threading.Lock()
        self._queue: List[Tuple[socket.socket, bytes]] = []
        self._current: Optional[Tuple[socket.socket, bytes]] = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name=f"accept {url}")
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.setblocking(True)
            got = b""
            try:
                conn.sendall(sp.header(sp.REP))
                while len(got) < 8:
                    chunk = conn.recv(8 - len(got))
                    if not chunk:
                        break
                    got += chunk
                sp.check_header(got, sp.REQ, self.path)
            except OSError:  # a bad header, or a dialer that gave up at once: as eKuiper, go on
                conn.close()
                continue
            with self._lock:
                self._pipes[conn] = sp.FrameReader()

    def recv(self, timeout: float) -> bytes:
        """The next request's body; HostError("time out") after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self._queue:
            with self._lock:
                pipes = list(self._pipes)
            left = deadline - time.monotonic()
            if left <= 0:
                raise HostError("time out")
            ready, _, _ = select.select(pipes, [], [], min(left, _SLICE_MS / 1000)) if pipes \
                else (time.sleep(min(left, 0.01)) or ([], [], []))
            for conn in ready:
                try:
                    data = conn.recv(sp.READ_SIZE)
                except OSError:  # reset by a peer that died: the pipe is gone
                    data = b""
                with self._lock:
                    reader = self._pipes.get(conn)
                    if not data or reader is None:
                        self._pipes.pop(conn, None)
                        conn.close()
                        continue
                self._queue += [(conn, msg) for msg in reader.feed(data) if len(msg) >= 4]
        conn, msg = self._queue.pop(0)
        self._current = (conn, msg[:4])
        return msg[4:]

    def send(self, body: bytes) -> None:
        if self._current is None:
            raise HostError("no request pending")
        (conn, rid), self._current = self._current, None
        try:
            conn.sendall(sp.frame(rid + body))
        except OSError:
            pass  # that pipe closed: mangos drops the reply

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        with self._lock:
            for conn in self._pipes:
                conn.close()
            self._pipes.clear()
        self.listener.close()
        paths.unlink_if_ours(self.path, self.ident)


class NativePull:
    """eKuiper's PULL listener spoken natively: an :class:`sp.PullEndpoint` plus a thread
    that accepts new connections at once. A mangos listener accepts and sends its SP header
    whether or not anyone receives, and a dialer (the plugin) waits for that header; the
    endpoint itself accepts only inside ``recv_many``. What the accepting thread reads on
    the way is kept for the next ``recv_many``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.endpoint = sp.PullEndpoint(url)
        self._lock = threading.Lock()
        self._early: List[bytes] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True, name=f"accept {url}")
        self._thread.start()

    def _accept_loop(self) -> None:
        listener = self.endpoint.listener
        while not self._closed.is_set():
            try:
                ready, _, _ = select.select([listener], [], [], _SLICE_MS / 1000)
            except (OSError, ValueError):
                return
            if not ready:
                continue
            with self._lock:
                if self._closed.is_set():
                    return
                got = self.endpoint.recv_many(1 << 30)
                if got:
                    self._early += got
                    os.write(self._wake_w, b"x")

    def recv_many(self, n: int) -> List[bytes]:
        """Up to ``n`` whole messages available now (non-blocking)."""
        with self._lock:
            if not self._early:
                return self.endpoint.recv_many(n)
            out, self._early = self._early[:n], self._early[n:]
            if not self._early:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            if len(out) < n:
                out += self.endpoint.recv_many(n - len(out))
            return out

    def wait(self, timeout: float) -> None:
        """Until a message may be there, at most ``timeout`` seconds."""
        select.select([self.endpoint, self._wake_r], [], [], timeout)

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        with self._lock:
            self.endpoint.close()
            os.close(self._wake_r)
            os.close(self._wake_w)


def _send_all(push: sp.PushEndpoint, data: bytes, timeout: float) -> None:
    """Send one message and wait until the socket has taken all of it, as a mangos pipe
    writes each message with one blocking write; TransportTimeout after ``timeout``.

    mangos notices at once that the peer closed (its pipe reader ends) and keeps the next
    message for the next pipe (the plugin listening again after a restart); a plain socket
    notices only when a write fails, and the message goes with it. A PUSH connection never
    carries data back, so a readable one is closed: it is dropped before the send."""
    sock = push.sock
    if sock is not None and select.select([sock], [], [], 0)[0]:
        with push.lock:
            if push.sock is sock:
                push._lost()
    push.send(data)
    deadline = time.monotonic() + timeout
    while push.pending():
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransportTimeout(f"{push.url}: the peer took nothing for {timeout:g}s")
        sock = push.sock
        if sock is None:  # lost: the next flush redials
            time.sleep(min(left, 0.01))
        else:
            select.select([], [sock], [], min(left, 0.1))
        push.flush()


def _decode(data: bytes, what: str) -> dict:
    try:
        return json.loads(data)
    except ValueError as e:
        raise HostError(f"Invalid data format, cannot decode {data[:200]!r} from {what} "
                        f"to json format with error {e}") from e


class SourceHandle:
    """One running source instance: eKuiper's PULL socket plus the Control."""

    def __init__(self, host: Host, ctrl: dict, sock: Union[pynng.Socket, "NativePull"], url: str):
        self.host, self.ctrl, self.url = host, ctrl, url
        self._sock: Optional[pynng.Socket] = sock

    def recv(self, timeout: float = 5.0) -> dict:
        """The next decoded wrapper, ``{"message": ..., "meta": ...}`` (or ``{"error": ...}``)."""
        if self._sock is None:
            raise HostError("source is stopped")
        data = self.host._recv(self._sock, timeout, lambda: f"no message from source "
                               f"{self.ctrl['symbolName']} within {timeout:g} s")
        return _decode(data, "source")

    def stop(self, timeout: Optional[float] = None) -> None:
        """Close the data socket, then send stop with the same Control. Idempotent."""
        if self._sock is None:
            return
        _close(self._sock, self.url)
        self._sock = None
        self.host._forget(self)
        self.host._stop_symbol(self.ctrl, timeout)


class SinkHandle:
    """One running sink instance: eKuiper's PUSH (data) and PULL (ack) sockets."""

    def __init__(self, host: Host, ctrl: dict, data: Union[pynng.Socket, sp.PushEndpoint],
                 ack: Union[pynng.Socket, "NativePull"], url: str, require_ack: bool):
        self.host, self.ctrl, self.url, self.require_ack = host, ctrl, url, require_ack
        self._data: Optional[Union[pynng.Socket, sp.PushEndpoint]] = data
        self._ack: Optional[Union[pynng.Socket, "NativePull"]] = ack

    def send(self, data: bytes) -> None:
        """One item on the data socket; returns once the socket took it (HostError after
        the send timeout)."""
        if self._data is None:
            raise HostError("sink is stopped")
        try:
            if isinstance(self._data, sp.PushEndpoint):
                _send_all(self._data, data, SEND_TIMEOUT)
            else:
                self._data.send(data)
        except (pynng.Timeout, TransportTimeout) as e:
            raise HostError(f"sink {self.ctrl['symbolName']}: send timed out after {SEND_TIMEOUT:g} s") from e

    def recv_ack(self, timeout: float = 5.0) -> dict:
        """The next ack: ``{}`` or ``{"error": ...}``."""
        if self._ack is None:
            raise HostError("sink is stopped")
        data = self.host._recv(self._ack, timeout, lambda: f"no ack from sink "
                               f"{self.ctrl['symbolName']} within {timeout:g} s")
        return _decode(data, "sink ack")

    def collect(self, data: bytes, timeout: float = 5.0) -> Optional[dict]:
        """PortableSink.Collect: send; with requireAck wait for and return the ack."""
        self.send(data)
        return self.recv_ack(timeout) if self.require_ack else None

    def stop(self, timeout: Optional[float] = None) -> None:
        """Close data and ack sockets, then send stop. Idempotent."""
        if self._data is None:
            return
        _close(self._data, self.url)
        _close(self._ack, self.url[:-len(".ipc")] + "_ack.ipc")
        self._data = self._ack = None
        self.host._forget(self)
        self.host._stop_symbol(self.ctrl, timeout)


def _native_request(sock: NativeRep, payload: bytes, timeout: float,
                    timeout_text: Callable[[], str]) -> bytes:
    """connection.go's Req over a native REP: send (taking the pending message first when no
    request is pending), receive, and send again on a (late) handshake."""
    while True:
        try:
            try:
                sock.send(payload)
            except HostError:  # ErrProtoState: "discard previous response"
                sock.recv(timeout)
                sock.send(payload)
            result = sock.recv(timeout)
        except HostError as e:
            raise HostError(timeout_text()) from e
        if result[:1] != b"h":
            return result


class FunctionHandle:
    """eKuiper's PortableFunc: one REP channel per function symbol."""

    def __init__(self, host: Host, symbol: str, sock: pynng.Socket, url: str):
        self.host, self.symbol, self.url = host, symbol, url
        self._sock: Optional[pynng.Socket] = sock
        self._lock = threading.Lock()  # calls to one symbol never overlap

    def request(self, payload: Union[dict, bytes], timeout: Optional[float] = None) -> dict:
        """Send one request (dict, or raw bytes) and return the decoded reply."""
        if self._sock is None:
            raise HostError(f"function {self.symbol} channel is closed")
        raw = payload if isinstance(payload, bytes) else go_json(payload)
        t = self.host.recv_timeout if timeout is None else timeout
        host = self.host

        def timeout_text() -> str:
            return f"time out, plugin {host.name} status {'running' if host.alive() else 'error'}, message: "

        with self._lock:
            res = (_native_request(self._sock, raw, t, timeout_text) if isinstance(self._sock, NativeRep)
                   else host._rep_request(self._sock, raw, t, timeout_text))
        try:
            return json.loads(res)
        except ValueError as e:
            raise HostError(f"Failed to unmarshal function result {res[:200]!r}") from e

    def validate(self, args: list) -> dict:
        return self.request({"func": "Validate", "arg": _sorted_maps(list(args))})

    def is_aggregate(self) -> dict:
        return self.request({"func": "IsAggregate", "arg": None})

    def exec(self, args: list, rule: str = "rule", op: str = "op", instance: int = 0,
             func_id: int = 0) -> dict:
        """Exec with the FuncMeta JSON text appended as the last argument."""
        fmeta = go_json({"ruleId": rule, "opId": op, "instanceId": instance, "funcId": func_id})
        return self.request({"func": "Exec", "arg": _sorted_maps(list(args)) + [fmeta.decode("utf-8")]})

    def close(self) -> None:
        """Close the channel only; functions are never stopped (PortableFunc.Close)."""
        if self._sock is None:
            return
        with self._lock:
            _close(self._sock, self.url)
            self._sock = None
        self.host._forget(self)
