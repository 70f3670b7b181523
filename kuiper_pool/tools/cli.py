"""kuiper-pool: check and package a plugin, try it against the embedded eKuiper stand-in,
and ask a running supervisor how it is.

Every command writes its errors to stderr, one line each, and exits with 0 (done), 1 (the
plugin, the supervisor or a check failed) or 2 (usage: a bad argument, folder, rule or call)."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Callable, Dict, List, Optional

from ..version import __version__

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def cmd_try(args: argparse.Namespace) -> int:
    from .rule import RuleError, load_calls, parse_call, run_rule

    try:
        calls = [parse_call(symbol, text) for symbol, text in args.call or []]
        if args.calls:
            calls += load_calls(args.calls)
    except RuleError as e:
        args.subparser.error(str(e))
    return run_rule(_plugin_dir(args), args.rule, python=args.python, keep_running=args.keep_running,
                    calls=calls)


def _no_answer(command: str, e: Exception, runtime_dir: str) -> int:
    """A supervisor that cannot be asked, in one line on stderr; when none was found, where
    we looked and how that place is chosen."""
    from .. import paths
    from ..runtime.status import NoSupervisor

    text = str(e)
    if isinstance(e, NoSupervisor):
        if runtime_dir:
            how = f"--runtime-dir {runtime_dir}"
        elif os.environ.get("TMPDIR"):
            how = f"TMPDIR={os.environ['TMPDIR']}"
        else:
            how = "no TMPDIR and no --runtime-dir"
        text += (f"; looked in {paths.usual_base(runtime_dir)} and {paths.usual_base(runtime_dir)}-* "
                 f"(uid {os.getuid()}, {how}): a supervisor makes its socket in <runtime_dir or "
                 f"TMPDIR or /tmp>/kuiper_pool-<uid of the user eKuiper runs as>, so run this as "
                 f"that user with eKuiper's TMPDIR, or give --runtime-dir when the plugin sets "
                 f"runtime_dir")
    print(f"kuiper-pool {command}: {text}", file=sys.stderr)
    return EXIT_FAIL


def cmd_status(args: argparse.Namespace) -> int:
    from ..runtime.status import StatusError, query

    if args.interval <= 0:
        args.subparser.error("--interval must be a positive number of seconds")
    while True:
        try:
            snap = query(args.plugin, args.runtime_dir)
        except StatusError as e:
            return _no_answer("status", e, args.runtime_dir)
        out = json.dumps(snap, indent=2) if args.json else format_status(snap)
        if not args.watch:
            print(out)
            return EXIT_OK
        print("\033[H\033[2J" + out, flush=True)
        time.sleep(args.interval)


def cmd_restart(args: argparse.Namespace) -> int:
    from ..runtime.status import StatusError, request

    try:
        answer = request(args.plugin, {"cmd": "restart", "symbol": args.symbol}, args.runtime_dir)
    except StatusError as e:
        return _no_answer("restart", e, args.runtime_dir)
    lines = answer.get("lines") if isinstance(answer, dict) else None
    if not lines:
        print(f"kuiper-pool restart: {answer.get('error') if isinstance(answer, dict) else answer}",
              file=sys.stderr)
        return EXIT_USAGE if isinstance(answer, dict) and answer.get("usage") else EXIT_FAIL
    for line in lines:
        print(line)
    return EXIT_OK if any(line.endswith(": restarting") for line in lines) else EXIT_FAIL


def cmd_reload(args: argparse.Namespace) -> int:
    from ..runtime.status import StatusError, request

    def ask(req: Dict) -> Dict:
        answer = request(args.plugin, req, args.runtime_dir)
        if not isinstance(answer, dict) or answer.get("error"):
            raise StatusError(answer.get("error") if isinstance(answer, dict) else str(answer))
        return answer

    deadline = time.monotonic() + args.timeout
    try:
        outcome = ask({"cmd": "reload", "check": args.check})
        while not outcome["done"]:
            if time.monotonic() > deadline:
                print(f"kuiper-pool reload: plugin {args.plugin}: no outcome within {args.timeout:g}s "
                      f"(the reload goes on; see the plugin's log)", file=sys.stderr)
                return EXIT_FAIL
            time.sleep(0.1)
            outcome = ask({"cmd": "reload_status", "id": outcome["id"]})
    except StatusError as e:
        return _no_answer("reload", e, args.runtime_dir)
    for line in outcome["lines"]:
        print(line)
    return EXIT_OK if outcome["ok"] else EXIT_FAIL


def _plugin_dir(args: argparse.Namespace) -> str:
    """The plugin folder argument; a usage error (exit 2) if it is not a folder."""
    if not os.path.isdir(args.plugin_dir):
        what = "it is a file" if os.path.exists(args.plugin_dir) else "it does not exist"
        args.subparser.error(f"{args.plugin_dir} is not a folder ({what}; give the folder that "
                             f"holds <name>.json and the executable)")
    return args.plugin_dir


def cmd_metrics(args: argparse.Namespace) -> int:
    from .exporter import serve

    return serve(args.listen, args.runtime_dir)


def cmd_package(args: argparse.Namespace) -> int:
    from .packaging import Options, build
    from .wheels import Target

    error = args.subparser.error
    if args.output is not None and not args.output.endswith(".zip"):
        error(f"-o {args.output}: eKuiper installs only files whose name ends in .zip")
    if not args.offline and (args.platform or args.python_version):
        error("--platform and --python-version choose the wheels of --offline; add --offline")
    if args.python_version is not None and not re.fullmatch(r"3\.\d{1,2}", args.python_version):
        error(f"--python-version {args.python_version}: give a Python 3 version as 3.11")
    if args.no_kuiper_pool and args.kuiper_pool_wheel:
        error("--kuiper-pool-wheel and --no-kuiper-pool exclude each other")
    if args.kuiper_pool_wheel and not os.path.isfile(args.kuiper_pool_wheel):
        error(f"--kuiper-pool-wheel {args.kuiper_pool_wheel}: no such file")
    if args.timeout <= 0:
        error("--timeout must be a positive number of seconds")
    target = None
    if args.offline:
        target = Target(platforms=args.platform or [])
        target.python_version = args.python_version or target.python_version
    opts = Options(venv=args.venv, offline=target, carry_kuiper_pool=not args.no_kuiper_pool,
                   kuiper_pool_wheel=args.kuiper_pool_wheel, run=not args.no_run, python=args.python,
                   timeout=args.timeout)
    return build(_plugin_dir(args), args.output, opts, quiet=args.quiet)


def cmd_validate(args: argparse.Namespace) -> int:
    from .validate import validate

    if args.timeout <= 0:
        args.subparser.error("--timeout must be a positive number of seconds")
    return validate(_plugin_dir(args), python=args.python, timeout=args.timeout)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import emit_service, serve

    plugin_dir = _plugin_dir(args)
    if args.emit_service:
        return emit_service(plugin_dir, args.emit_service, args.address)
    return serve(plugin_dir, args.python, args.listen)


LAST_ERROR_WIDTH = 60   # characters of LAST ERROR in the table; --json has it whole


def format_status(snap: Dict) -> str:
    """The status table a person reads. Times are the local clock's, as in the log."""
    head = (f"plugin {snap['plugin']}  supervisor pid {snap['pid']}  zygote pid {snap['zygote_pid']}"
            f"  up {_duration(snap['uptime'])}  instances {len(snap['instances'])}"
            f"  kuiper_pool {snap.get('version', '?')}")
    cols = ["SYMBOL", "TYPE", "RULE/OP/INST", "PID", "STATE", "UPTIME", "RESTARTS", "RSS",
            "CPU%", "IN", "OUT", "ERRORS", "LAST ERROR"]
    rows: List[List[str]] = []
    cut = shared = False
    once = "shared_workers" in snap  # a shared worker's figures shown once (an older supervisor's: on each)
    for i in sorted(snap["instances"], key=lambda i: (i["symbol"], i["rule"], i["op"], i["instance"])):
        where = (f"{i['rule']}/{i['op']}/{i['instance']}" if i["type"] != "func" else
                 f"serve worker {i['instance']}" if i["instance"] else "(all rules)")
        state = i["state"]
        if i.get("next_retry_at"):
            state += f", retry in {_duration(max(i['next_retry_at'] - snap['time'], 0.0))}"
        error = _cut(i["last_error"], LAST_ERROR_WIDTH)
        cut = cut or error != i["last_error"]
        if error and i.get("last_error_at"):
            error = f"{_clock(i['last_error_at'], snap['time'])} {error}"
        pid = str(i["pid"] or "-") + ("*" if i.get("shared") and i["pid"] else "")
        shared = shared or pid.endswith("*")
        rss, cpu = f"{i['rss'] / 1048576:.1f}M", f"{i['cpu_percent']:.0f}"
        if pid.endswith("*") and once:
            rss = cpu = "*"
        rows.append([i["symbol"], i["type"], where, pid, state,
                     _duration(i["uptime"]), _restarts(i, snap["time"]),
                     rss, cpu, str(i["items_in"]), str(i["items_out"]), str(i["errors"]), error or "-"])
    lines = [head, ""] + _table(cols, rows)
    procs = sorted(snap.get("shared_workers") or [], key=lambda p: (p["symbol"], p["pid"]))
    if procs:
        lines += [""] + _table(["SHARED PID", "SYMBOL", "TYPE", "INSTANCES", "RSS", "CPU%"],
                               [[str(p["pid"]), p["symbol"], p["type"], str(len(p["instances"])),
                                 f"{p['rss'] / 1048576:.1f}M", f"{p['cpu_percent']:.0f}"] for p in procs])
    if shared:
        lines += ["", "(PID*: one worker process shared by its symbol's instances, workers: per_symbol; "
                      + ("its RSS and CPU% are shown once, under SHARED PID)" if once else
                         "its RSS and CPU% are the process's)")]
    if cut:
        lines += ["", f"(LAST ERROR is cut; kuiper-pool status {snap['plugin']} --json has it whole)"]
    return "\n".join(lines)


def _table(cols: List[str], rows: List[List[str]]) -> List[str]:
    """``cols`` and ``rows`` as lines of left-aligned columns."""
    widths = [max(len(r[c]) for r in rows + [cols]) for c in range(len(cols))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [cols] + rows]


def _restarts(inst: Dict, now: float) -> str:
    """``3 (2 hang, 1 signal) last 14:02:11``."""
    text = str(inst["restarts"])
    causes = inst.get("restart_causes") or {}
    if causes:
        text += " (" + ", ".join(f"{n} {cause}" for cause, n in sorted(causes.items())) + ")"
    recent = inst.get("recent_restarts") or []
    if recent:
        text += f" last {_clock(recent[-1]['at'], now)}"
    return text


def _cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, cut at a word boundary."""
    if len(text) <= width:
        return text
    head = text[:width - 3]
    space = head.rfind(" ")
    if space > width // 2:
        head = head[:space]
    return head.rstrip(" ,;:") + "..."


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _clock(at: float, now: float) -> str:
    """A past moment on the local clock: the time of day, with the date when not today."""
    then = time.localtime(at)
    return time.strftime("%H:%M:%S" if then[:3] == time.localtime(now)[:3] else "%m-%d %H:%M", then)


COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {
    "try": cmd_try, "status": cmd_status, "restart": cmd_restart, "reload": cmd_reload,
    "metrics": cmd_metrics, "package": cmd_package,
    "validate": cmd_validate, "serve": cmd_serve}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kuiper-pool", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    t = sub.add_parser("try", help="run a plugin's rule.json through the embedded eKuiper stand-in",
                       description="Start the plugin exactly as eKuiper does, run the small rule "
                                   "described in <plugin-dir>/rule.json, print what flows, stop. "
                                   "Each line says whose it is: try (this runner), plugin (what "
                                   "the plugin's code prints) or kuiper_pool (its log). A plugin "
                                   "with only functions is tried with --call or --calls. Exit "
                                   "status: 0 ran, 1 the plugin failed, 2 usage (folder, rule, "
                                   "calls).")
    t.add_argument("plugin_dir", help="folder with <name>.json and the plugin's executable")
    t.add_argument("--rule", help="rule file (default: <plugin-dir>/rule.json)")
    t.add_argument("--python", default=sys.executable,
                   help="interpreter to run the plugin with, like eKuiper's portable.pythonBin "
                        "(default: this one)")
    t.add_argument("--call", nargs=2, action="append", metavar=("SYMBOL", "ARGS"),
                   help="call function SYMBOL with ARGS, a JSON array (e.g. '[\"abc\"]'), and "
                        "print the result instead of running the rule; may be repeated")
    t.add_argument("--calls", metavar="FILE",
                   help='calls from a JSON file: [{"symbol": "revert", "args": ["abc"]}, ...]')
    t.add_argument("--keep-running", action="store_true",
                   help="run the rule (or keep the plugin up after the calls) until Ctrl-C or "
                        "SIGTERM, to try kuiper-pool status, restart, reload and metrics on it; "
                        "then stop everything")
    t.set_defaults(subparser=t)
    s = sub.add_parser("status", help="show a running supervisor's instances",
                       description="Ask the supervisor of a running plugin (over its private "
                                   "socket) for its instances, workers and counters.")
    s.add_argument("plugin", help="the plugin's name")
    s.add_argument("--json", action="store_true", help="print the raw snapshot as JSON")
    s.add_argument("--watch", action="store_true", help="refresh until interrupted")
    s.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    s.add_argument("--runtime-dir", default="", help="the plugin's runtime_dir setting, if set")
    s.set_defaults(subparser=s)
    r = sub.add_parser("restart", help="restart a running plugin's instances now",
                       description="Ask the supervisor of a running plugin to restart the "
                                   "instances of one symbol (all instances without one): failed "
                                   "or backing-off instances start at once, running workers are "
                                   "replaced gracefully. One line per instance. Exit status: 0 "
                                   "something restarted, 1 nothing to restart or no supervisor, "
                                   "2 a symbol the plugin lacks.")
    r.add_argument("plugin", help="the plugin's name")
    r.add_argument("symbol", nargs="?", help="a source, sink or function symbol of the plugin")
    r.add_argument("--runtime-dir", default="", help="the plugin's runtime_dir setting, if set")
    rl = sub.add_parser("reload", help="serve a running plugin's new code without stopping a rule",
                        description="Ask the supervisor of a running plugin (the same as sending it "
                                    "SIGHUP) to import the plugin's code and kuiper_pool.yaml as they "
                                    "are on disk now, validate them (every running symbol present, "
                                    "settings valid), then replace its workers one at a time: no sink "
                                    "item is lost and no function call fails. If the new code does "
                                    "not import or validate, nothing changes and the reason is one "
                                    "line. Exit status: 0 reloaded (or checked), 1 refused or no "
                                    "supervisor.")
    rl.add_argument("plugin", help="the plugin's name")
    rl.add_argument("--check", action="store_true", help="only import and validate the new code")
    rl.add_argument("--timeout", type=float, default=120.0,
                    help="seconds to wait for the outcome (default 120)")
    rl.add_argument("--runtime-dir", default="", help="the plugin's runtime_dir setting, if set")
    m = sub.add_parser("metrics", help="serve every running plugin's Prometheus metrics over HTTP",
                       description="Serve GET/HEAD /metrics with the metrics of every kuiper_pool "
                                   "plugin running as this user, asked from each supervisor's "
                                   "status socket at every scrape and labelled by plugin. Runs "
                                   "until SIGTERM or Ctrl-C.")
    m.add_argument("--listen", default="127.0.0.1:9464",
                   help="host:port to serve on (default 127.0.0.1:9464; a non-loopback host "
                        "serves beyond this machine: only when you mean it)")
    m.add_argument("--runtime-dir", action="append", default=[],
                   help="a runtime_dir setting the plugins use, if set (repeatable)")
    k = sub.add_parser("package", help="build the zip eKuiper installs",
                       description="Check the plugin folder as kuiper-pool validate does (running "
                                   "its main, unless --no-run) and build the zip: <name>.json at "
                                   "the root, the executable and the folder's modules and files, "
                                   "sources/sinks/functions metadata, wheels/ with the kuiper-pool "
                                   "wheel (kuiper-pool is on no package index), and install.sh "
                                   "(generated to pip install that wheel and requirements.txt when "
                                   "the folder has none). Refuses, listing every problem, when "
                                   "eKuiper would reject the zip or the plugin fails its checks. "
                                   "Exit status: 0 built, 1 refused, 2 usage.")
    k.add_argument("plugin_dir", help="folder with <name>.json and the plugin's executable")
    k.add_argument("-o", "--output", help="zip to write (default: <name>.zip in the current folder)")
    k.add_argument("-q", "--quiet", action="store_true",
                   help="print only problems, warnings and the zip's path, not every file added")
    k.add_argument("--venv", action="store_true",
                   help="give the plugin a virtual environment of its own: install.sh creates "
                        ".venv in the plugin folder and installs into it, and the json's "
                        "executable becomes a generated entry that runs the plugin with "
                        ".venv/bin/python (plugins pinning different library versions can then "
                        "share one pythonBin)")
    k.add_argument("--offline", action="store_true",
                   help="for edge nodes with no package index: put the wheels of kuiper-pool, its "
                        "dependencies and every requirement into wheels/ (pip download, binary "
                        "wheels only), and make install.sh install from them alone (pip --no-index)")
    k.add_argument("--platform", action="append", metavar="TAG",
                   help="with --offline: a pip platform tag of the edge node, e.g. "
                        "manylinux_2_28_aarch64 (repeatable; default: this machine's)")
    k.add_argument("--python-version", metavar="X.Y",
                   help="with --offline: the Python version of the edge node's pythonBin "
                        "(default: this Python's)")
    k.add_argument("--kuiper-pool-wheel", metavar="PATH",
                   help="the kuiper-pool wheel to carry (default: one made from this installation)")
    k.add_argument("--no-kuiper-pool", action="store_true",
                   help="carry no kuiper-pool wheel: eKuiper's Python has kuiper-pool already, or "
                        "requirements.txt gets it from an index of yours")
    k.add_argument("--python", default=sys.executable,
                   help="interpreter to run the plugin's checks with (default: this one)")
    k.add_argument("--timeout", type=float, default=60.0,
                   help="seconds the executable may take to reach plugin.start (default 60)")
    k.add_argument("--no-run", action="store_true",
                   help="do not run the plugin's main to check it (its requirements are not "
                        "installed here); the folder checks still apply")
    k.set_defaults(subparser=k)
    v = sub.add_parser("validate", help="check that eKuiper would install and run a plugin",
                       description="Check the plugin json, executable and metadata as eKuiper's "
                                   "installer does, then run the executable as eKuiper would, "
                                   "with KUIPERPOOL_DESCRIBE=1 so that plugin.start reports its "
                                   "symbols instead of serving (nothing connects to eKuiper): "
                                   "the json's symbols must match the PluginConfig, every factory "
                                   "must build an object with the right methods, the settings "
                                   "must load. One line per check. Exit status: 0 ok, 1 a "
                                   "problem, 2 usage.")
    v.add_argument("plugin_dir", help="folder with <name>.json and the plugin's executable")
    v.add_argument("--python", default=sys.executable,
                   help="interpreter to run the plugin with, like eKuiper's portable.pythonBin "
                        "(default: this one)")
    v.add_argument("--timeout", type=float, default=60.0,
                   help="seconds the executable may take to reach plugin.start (default 60)")
    v.set_defaults(subparser=v)
    sv = sub.add_parser("serve", help="serve a plugin's functions as an eKuiper external service",
                        description="Run the plugin unchanged with its functions served over REST "
                                    "as eKuiper's external service functions call them, each "
                                    "function by serve_workers supervised worker processes "
                                    "(kuiper_pool.yaml). SIGTERM drains, then stops. With "
                                    "--emit-service DIR, write the service JSON and the .proto "
                                    "eKuiper registers (DIR/<plugin>.json, DIR/schemas/<plugin>.proto) "
                                    "and exit. See docs/serve.md.")
    sv.add_argument("plugin_dir", help="folder with <name>.json and the plugin's executable")
    sv.add_argument("--listen", help="host:port to serve on (default: serve_listen, 127.0.0.1:9081)")
    sv.add_argument("--python", default=sys.executable, help="interpreter to run the plugin with "
                                                             "(default: this one)")
    sv.add_argument("--emit-service", metavar="DIR", help="write the service files to DIR and exit")
    sv.add_argument("--address", help="with --emit-service: the URL eKuiper calls (default: "
                                      "http://<serve_listen>, 0.0.0.0 as 127.0.0.1)")
    sv.set_defaults(subparser=sv)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:  # Ctrl-C (e.g. ending --watch): the shell's usual 128 + SIGINT
        return 130


if __name__ == "__main__":
    sys.exit(main())
