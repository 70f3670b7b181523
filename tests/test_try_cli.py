"""``kuiper-pool try`` as a newcomer meets it: every bad input is one line on stderr naming the
real cause (exit 2 for what the user gives, 1 for what the plugin does), never a traceback;
function-only plugins are tried with ``--call``/``--calls``; ``--keep-running`` serves the
rule until Ctrl-C or SIGTERM and then cleans up.

Generated plugins have names (plugin, rule, symbols) unique to the test.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest

from conftest import ipc_files, kuiper_pool_cli as cli, kuiper_pool_command, wait_until
from plugins import COUNTING_SOURCE, MODE_FUNCTION, REPO, make_plugin

PYSAM = os.path.join(REPO, "examples", "pysam")


def one_error(proc: subprocess.CompletedProcess, code: int) -> str:
    """The one stderr line of a command that failed with ``code``, checked to be no traceback."""
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith(("usage:", " "))]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_a_file_or_a_missing_folder_is_a_usage_error(tmp_path):
    line = one_error(cli("try", os.path.join(PYSAM, "pysam.py")), 2)
    assert line.endswith("pysam.py is not a folder (it is a file; give the folder that holds "
                         "<name>.json and the executable)"), line
    line = one_error(cli("try", tmp_path / "nowhere"), 2)
    assert "nowhere is not a folder (it does not exist;" in line


def test_a_plugin_json_with_a_syntax_error_is_reported_as_validate_reports_it(tmp_path, unique):
    pd = make_plugin(str(tmp_path), f"kp{unique}", functions={f"fn{unique}": MODE_FUNCTION})
    with open(os.path.join(pd, f"kp{unique}.json"), "a") as f:
        f.write("}")
    line = one_error(cli("try", pd, "--call", f"fn{unique}", "[]"), 2)
    validate = cli("validate", pd)
    (problem,) = [ln for ln in validate.stdout.splitlines() if ln.startswith("problem  plugin json: ")]
    assert line == f"kuiper-pool try: {problem[len('problem  plugin json: '):]} (in {pd})", (line, problem)
    assert f"kp{unique}.json is not valid JSON: Extra data" in line


def test_a_plugin_killed_by_a_signal_says_which(tmp_path, unique):
    pd = make_plugin(str(tmp_path), f"kp{unique}", functions={f"fn{unique}": MODE_FUNCTION},
                     main_code="import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    line = one_error(cli("try", pd, "--call", f"fn{unique}", "[]"), 1)
    assert line == f"kuiper-pool try: plugin kp{unique} killed by signal 9 (SIGKILL) before the handshake"


def test_a_plugin_already_served_names_who_may_serve_it(tmp_path, unique, host_runs):
    pd = make_plugin(str(tmp_path), f"kp{unique}", functions={f"fn{unique}": MODE_FUNCTION})
    host_runs.launch(pd)  # eKuiper (here its stand-in) serves the plugin
    line = one_error(cli("try", pd, "--call", f"fn{unique}", '["echo", 1]'), 1)
    assert line == (f"kuiper-pool try: plugin kp{unique} is already being served: another `kuiper-pool "
                    f"try` or eKuiper listens on /tmp/plugin_kp{unique}.ipc (stop it first)")


def test_a_function_name_another_plugin_uses_is_named_as_the_cause(tmp_path, unique, host_runs):
    first = make_plugin(str(tmp_path), f"kpa{unique}", functions={f"fn{unique}": MODE_FUNCTION})
    second = make_plugin(str(tmp_path), f"kpb{unique}", functions={f"fn{unique}": MODE_FUNCTION})
    host_runs.launch(first).start_function(f"fn{unique}")
    line = one_error(cli("try", second, "--call", f"fn{unique}", '["echo", 1]'), 1)
    assert line == (f"kuiper-pool try: function fn{unique}: /tmp/func_fn{unique}.ipc is in use: another "
                    f"plugin with a function named fn{unique} is running (eKuiper names a function's "
                    f"socket after its symbol alone, so function names must differ across plugins)")


@pytest.mark.parametrize("args, message", [
    (["--call", "fn{u}", "abc"], "--call fn{u}: the arguments must be a JSON array, like"),
    (["--call", "fn{u}", '{{"a": 1}}'], "--call fn{u}: the arguments must be a JSON array, like"),
    (["--call", "nosuch", "[]"], "function 'nosuch' is not one of the plugin's functions (fn{u})"),
    (["--calls", "{tmp}/none.json"], "cannot read calls file {tmp}/none.json: No such file"),
    (["--calls", "{tmp}/calls.json"], "calls.json[0].args must be a list"),
    ([], "plugin kp{u} has no source and {pd}/rule.json does not exist: call its functions with "
         "--call SYMBOL '[args]' or --calls FILE"),
    (["--rule", "{tmp}/calls.json"], "rule must be an object"),
])
def test_bad_calls_and_rules_are_usage_errors(tmp_path, unique, args, message):
    pd = make_plugin(str(tmp_path), f"kp{unique}", functions={f"fn{unique}": MODE_FUNCTION})
    (tmp_path / "calls.json").write_text(json.dumps([{"symbol": f"fn{unique}", "args": 1}]))
    fill = dict(u=unique, tmp=tmp_path, pd=pd)
    line = one_error(cli("try", pd, *[a.format(**fill) for a in args]), 2)
    assert message.format(**fill) in line, line
    assert not ipc_files(unique)


def test_a_function_only_plugin_is_tried_with_calls_from_the_command_line_and_a_file(tmp_path, unique,
                                                                                    ipc_leak_check):
    pd = make_plugin(str(tmp_path), f"kp{unique}", functions={f"fn{unique}": MODE_FUNCTION,
                                                              f"gn{unique}": MODE_FUNCTION})
    calls = tmp_path / "calls.json"
    calls.write_text(json.dumps([{"symbol": f"gn{unique}", "args": ["echo", {"a": [1, 2]}]}]))
    proc = cli("try", pd, "--call", f"fn{unique}", '["echo", "abc"]', "--calls", calls)
    assert proc.returncode == 0 and proc.stderr == "", proc.stdout + proc.stderr
    runner = [ln.split(" | ", 1)[1] for ln in proc.stdout.splitlines() if ln.startswith("try ")]
    assert f'fn{unique}("echo", "abc") -> "abc"' in runner
    assert f'gn{unique}("echo", {{"a":[1,2]}}) -> {{"a":[1,2]}}' in runner
    # a call that fails is one line on stderr naming function and cause, and exit 1
    proc = cli("try", pd, "--call", f"fn{unique}", '["raise"]', "--call", f"fn{unique}", '["invalid", 7]')
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    errors = proc.stderr.splitlines()
    assert len(errors) == 2 and errors[0].startswith(f'kuiper-pool try: fn{unique}("raise"): failed: plugin '
                                                      f'kp{unique} function fn{unique}'), errors
    assert errors[1] == f'kuiper-pool try: fn{unique}("invalid", 7): validate failed: invalid arguments [7]'


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_keep_running_serves_the_rule_until_stopped_then_cleans_up(tmp_path, unique, reaper, how):
    pd = make_plugin(str(tmp_path), f"kp{unique}", sources={f"src{unique}": COUNTING_SOURCE},
                     functions={f"fn{unique}": MODE_FUNCTION})
    with open(os.path.join(pd, "rule.json"), "w") as f:
        json.dump({"id": f"r{unique}", "source": {"symbol": f"src{unique}", "config": {"interval": 0.05}},
                   "functions": [{"symbol": f"fn{unique}", "args": ["echo", "$.n"]}], "count": 1}, f)
    out = tmp_path / "out.txt"
    with open(out, "w") as f:  # a session of its own, as a shell gives a foreground job
        proc = subprocess.Popen(kuiper_pool_command() + ["try", pd, "--keep-running"], stdout=f,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    reaper(proc.pid)
    wait_until(lambda: "#3 " in out.read_text(), timeout=30, message="rows past the rule's count")
    assert f"kuiper-pool status kp{unique}" in out.read_text()  # the runner says what to try
    status = cli("status", f"kp{unique}")
    assert status.returncode == 0 and f"fn{unique}" in status.stdout, status.stderr
    restart = cli("restart", f"kp{unique}", f"fn{unique}")
    assert restart.stdout.strip() == f"plugin kp{unique} function fn{unique}: running: restarting"
    seen = out.read_text().count(f"fn{unique}(")
    wait_until(lambda: out.read_text().count(f"fn{unique}(") > seen + 2, timeout=30,
               message="rows after the restart")
    if how == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
    else:  # a terminal's Ctrl-C: SIGINT to the foreground process group
        os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    text = out.read_text()
    assert re.search(r"^try +\| done: \d+ rows in ", text, re.M), text
    errors = proc.stderr.read()  # a call cut by the restart would be one line, and the run goes on
    assert "Traceback" not in errors and all(ln.startswith("kuiper-pool try: ") for ln in errors.splitlines())
    wait_until(lambda: not ipc_files(unique), timeout=5, message="the rule's ipc files removed")
    assert cli("status", f"kp{unique}").returncode == 1  # the supervisor is gone


@pytest.mark.parametrize("args, message", [
    (["status", "kp{u}", "--interval", "0"], "--interval must be a positive number of seconds"),
    (["status", "kp{u}", "--interval", "soon"], "invalid float value"),
    (["reload", "kp{u}", "--timeout", "soon"], "invalid float value"),
    (["restart"], "the following arguments are required: plugin"),
    (["try", "{tmp}", "--call", "fn"], "expected 2 arguments"),
])
def test_usage_errors_of_the_operator_commands_exit_2(tmp_path, unique, args, message):
    line = one_error(cli(*[a.format(u=unique, tmp=tmp_path) for a in args]), 2)
    assert message in line, line


@pytest.mark.parametrize("command", [[], ["try"], ["status"], ["restart"], ["reload"], ["package"],
                                     ["validate"]])
def test_help_is_plain_text(command):
    proc = cli(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert not re.search(r"``|:(mod|func|class|data):`", proc.stdout), proc.stdout
    if not command:
        assert proc.stdout.split("\n\n")[1].startswith("kuiper-pool: check and package a plugin")
        assert "exits with 0 (done), 1 (the\nplugin, the supervisor or a check failed) or 2" in proc.stdout
