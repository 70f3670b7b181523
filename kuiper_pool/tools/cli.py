"""``kuiper-pool``: check and package a plugin, try it against the embedded eKuiper stand-in,
and ask a running supervisor how it is."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, List, Optional

from .. import __version__

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def cmd_try(args: argparse.Namespace) -> int:
    from .rule import run_rule

    return run_rule(args.plugin_dir, args.rule, python=args.python)


def cmd_status(args: argparse.Namespace) -> int:
    from ..runtime.status import StatusError, query

    while True:
        try:
            snap = query(args.plugin, args.runtime_dir)
        except StatusError as e:
            print(f"kuiper-pool status: {e}", file=sys.stderr)
            return EXIT_FAIL
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
        print(f"kuiper-pool restart: {e}", file=sys.stderr)
        return EXIT_FAIL
    lines = answer.get("lines") if isinstance(answer, dict) else None
    if not lines:
        print(f"kuiper-pool restart: {answer.get('error') if isinstance(answer, dict) else answer}",
              file=sys.stderr)
        return EXIT_FAIL
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
        print(f"kuiper-pool reload: {e}", file=sys.stderr)
        return EXIT_FAIL
    for line in outcome["lines"]:
        print(line)
    return EXIT_OK if outcome["ok"] else EXIT_FAIL


def _plugin_dir(args: argparse.Namespace) -> str:
    """The plugin folder argument; a usage error (exit 2) if it is not a folder."""
    if not os.path.isdir(args.plugin_dir):
        args.subparser.error(f"{args.plugin_dir} is not a folder")
    return args.plugin_dir


def cmd_metrics(args: argparse.Namespace) -> int:
    from .exporter import serve

    return serve(args.listen, args.runtime_dir)


def cmd_package(args: argparse.Namespace) -> int:
    from .packaging import build

    if args.output is not None and not args.output.endswith(".zip"):
        args.subparser.error(f"-o {args.output}: eKuiper installs only files whose name ends in .zip")
    return build(_plugin_dir(args), args.output, quiet=args.quiet, venv=args.venv)


def cmd_validate(args: argparse.Namespace) -> int:
    from .validate import validate

    if args.timeout <= 0:
        args.subparser.error("--timeout must be a positive number of seconds")
    return validate(_plugin_dir(args), python=args.python, timeout=args.timeout)


def format_status(snap: Dict) -> str:
    """The status table a person reads."""
    head = (f"plugin {snap['plugin']}  supervisor pid {snap['pid']}  zygote pid {snap['zygote_pid']}"
            f"  up {_duration(snap['uptime'])}  instances {len(snap['instances'])}")
    cols = ["SYMBOL", "TYPE", "RULE/OP/INST", "PID", "STATE", "UPTIME", "RESTARTS", "RSS",
            "CPU%", "IN", "OUT", "ERRORS", "LAST ERROR"]
    rows: List[List[str]] = []
    for i in sorted(snap["instances"], key=lambda i: (i["symbol"], i["rule"], i["op"], i["instance"])):
        where = f"{i['rule']}/{i['op']}/{i['instance']}" if i["type"] != "func" else "(all rules)"
        rows.append([i["symbol"], i["type"], where, str(i["pid"] or "-"), i["state"],
                     _duration(i["uptime"]), str(i["restarts"]), f"{i['rss'] / 1048576:.1f}M",
                     f"{i['cpu_percent']:.0f}", str(i["items_in"]), str(i["items_out"]),
                     str(i["errors"]), i["last_error"][:60] or "-"])
    widths = [max(len(r[c]) for r in rows + [cols]) for c in range(len(cols))]
    lines = [head, ""] + ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()
                          for r in [cols] + rows]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {
    "try": cmd_try, "status": cmd_status, "restart": cmd_restart, "reload": cmd_reload,
    "metrics": cmd_metrics, "package": cmd_package,
    "validate": cmd_validate}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kuiper-pool", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    t = sub.add_parser("try", help="run a plugin's rule.json through the embedded eKuiper stand-in",
                       description="Start the plugin exactly as eKuiper does, run the small rule "
                                   "described in <plugin-dir>/rule.json, print what flows, stop.")
    t.add_argument("plugin_dir", help="folder with <name>.json and the plugin's executable")
    t.add_argument("--rule", help="rule file (default: <plugin-dir>/rule.json)")
    t.add_argument("--python", default=sys.executable,
                   help="interpreter to run the plugin with, like eKuiper's portable.pythonBin "
                        "(default: this one)")
    s = sub.add_parser("status", help="show a running supervisor's instances",
                       description="Ask the supervisor of a running plugin (over its private "
                                   "socket) for its instances, workers and counters.")
    s.add_argument("plugin", help="the plugin's name")
    s.add_argument("--json", action="store_true", help="print the raw snapshot as JSON")
    s.add_argument("--watch", action="store_true", help="refresh until interrupted")
    s.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    s.add_argument("--runtime-dir", default="", help="the plugin's runtime_dir setting, if set")
    r = sub.add_parser("restart", help="restart a running plugin's instances now",
                       description="Ask the supervisor of a running plugin to restart the "
                                   "instances of one symbol (all instances without one): failed "
                                   "or backing-off instances start at once, running workers are "
                                   "replaced gracefully. One line per instance. Exit status: 0 "
                                   "something restarted, 1 nothing to restart or no supervisor.")
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
                       description="Check the plugin folder as eKuiper's installer would and build "
                                   "the zip: <name>.json at the root, the executable and the "
                                   "folder's modules and files, sources/sinks/functions metadata, "
                                   "and install.sh (generated to pip install requirements.txt when "
                                   "the folder has none). Refuses, listing every problem, when "
                                   "eKuiper would reject the zip. Exit status: 0 built, 1 refused, "
                                   "2 usage.")
    k.add_argument("plugin_dir", help="folder with <name>.json and the plugin's executable")
    k.add_argument("-o", "--output", help="zip to write (default: <name>.zip in the current folder)")
    k.add_argument("-q", "--quiet", action="store_true",
                   help="print only problems and the zip's path, not every file added")
    k.add_argument("--venv", action="store_true",
                   help="give the plugin a virtual environment of its own: install.sh creates "
                        ".venv in the plugin folder from requirements.txt, and the json's "
                        "executable becomes a generated entry that runs the plugin with "
                        ".venv/bin/python (plugins pinning different library versions can then "
                        "share one pythonBin)")
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
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:  # Ctrl-C (e.g. ending --watch): the shell's usual 128 + SIGINT
        return 130


if __name__ == "__main__":
    sys.exit(main())
