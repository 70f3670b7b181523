from __future__ import annotations

import os
from typing import List, get_type_hints

import pytest
import yaml

from kuiper_pool import config
from kuiper_pool.config import SETTINGS, ConfigError, Setting, Settings, load_settings, render_defaults_yaml
from plugins import MODE_FUNCTION, make_plugin

REPO_FILE = os.path.join(os.path.dirname(__file__), "..", "config", "kuiper_pool.yaml")
DEFAULTS = {s.name: s.default for s in SETTINGS}


def write(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def assert_one_line(err: ConfigError, *parts: str) -> None:
    msg = str(err)
    assert "\n" not in msg and msg.startswith("kuiper_pool config: ")
    for part in parts:
        assert part in msg, (part, msg)


# --- registry and Settings --------------------------------------------------------------

def test_settings_fields_mirror_registry():
    fields = [f for f in Settings._fields if f != "symbols"]  # the per-symbol table
    assert fields == [s.name for s in SETTINGS]
    hints = get_type_hints(Settings)
    assert [hints[f] for f in fields] == [s.type for s in SETTINGS]


def test_registry_defaults_pass_their_own_validation_and_sections_are_contiguous():
    for s in SETTINGS:
        assert s.validate(s.default, "defaults") == s.default
        assert s.section in config.SECTIONS and s.description
    order = [s.section for s in SETTINGS]
    assert [sec for i, sec in enumerate(order) if i == 0 or order[i - 1] != sec] == list(config.SECTIONS)


def test_defaults_load():
    s = load_settings(environ={})
    assert s.as_dict() == {**DEFAULTS, "symbols": {}}
    assert s == Settings(**DEFAULTS)
    assert (s.start_method, s.heartbeat_interval, s.sink_window_mb, s.metrics_address) == ("auto", 0.5, 128.0, "")
    with pytest.raises(AttributeError):
        s.stop_grace = 1.0  # type: ignore[misc]


def test_as_dict_round_trips():
    s = load_settings(environ={}, overrides={"log_level": "debug", "max_calls": 7})
    assert Settings(**s.as_dict()) == s


# --- sources and precedence ---------------------------------------------------------------

def test_file_overrides_defaults(tmp_path):
    write(tmp_path / "kuiper_pool.yaml", "heartbeat_interval: 1\nlog_level: warning\nsink_window_mb: 5\n")
    s = load_settings(str(tmp_path), environ={})
    assert s.heartbeat_interval == 1.0 and type(s.heartbeat_interval) is float
    assert (s.log_level, s.sink_window_mb, s.stop_grace) == ("WARNING", 5, 2.0)


def test_missing_file_in_script_dir_is_fine(tmp_path):
    assert load_settings(str(tmp_path), environ={}) == Settings(**DEFAULTS)


@pytest.mark.parametrize("text", ["", "# only comments\n", "---\n"])
def test_empty_file_is_fine(tmp_path, text):
    write(tmp_path / "kuiper_pool.yaml", text)
    assert load_settings(str(tmp_path), environ={}) == Settings(**DEFAULTS)


def test_env_wins_over_file_and_overrides_win_over_env(tmp_path):
    write(tmp_path / "kuiper_pool.yaml", "stop_grace: 3\nmax_calls: 10\nsink_window_mb: 20\n")
    env = {"KUIPER_POOL_MAX_CALLS": "11", "KUIPER_POOL_SINK_WINDOW_MB": "21", "PATH": "/bin"}
    s = load_settings(str(tmp_path), environ=env)
    assert (s.stop_grace, s.max_calls, s.sink_window_mb) == (3.0, 11, 21)
    s = load_settings(str(tmp_path), overrides={"sink_window_mb": 22}, environ=env)
    assert (s.stop_grace, s.max_calls, s.sink_window_mb) == (3.0, 11, 22)


def test_config_env_replaces_script_dir_lookup(tmp_path):
    write(tmp_path / "kuiper_pool.yaml", "max_calls: 1\n")
    explicit = write(tmp_path / "other.yaml", "sink_window_mb: 9\n")
    s = load_settings(str(tmp_path), environ={"KUIPER_POOL_CONFIG": explicit})
    assert (s.max_calls, s.sink_window_mb) == (0, 9)


def test_config_env_missing_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as e:
        load_settings(str(tmp_path), environ={"KUIPER_POOL_CONFIG": missing})
    assert_one_line(e.value, "KUIPER_POOL_CONFIG", missing)


def test_os_environ_is_the_default(monkeypatch):
    monkeypatch.setenv("KUIPER_POOL_FLAP_WINDOW", "30")
    assert load_settings().flap_window == 30.0


# --- validation -----------------------------------------------------------------------------

BAD = [
    ("start_method", "forkserver"), ("start_method", "FORK"), ("start_method", 1),
    ("stop_grace", 0), ("stop_grace", -1), ("stop_grace", "2"), ("stop_grace", float("inf")),
    ("heartbeat_interval", 0.0), ("heartbeat_interval", None), ("heartbeat_interval", True),
    ("heartbeat_misses", 0), ("heartbeat_misses", 2.5), ("heartbeat_misses", 4.0),
    ("call_deadline", 0), ("call_deadline", float("nan")),
    ("sample_interval", -0.5),
    ("restart_backoff_initial", -0.1),
    ("restart_backoff_min", 0),
    ("restart_backoff_max", 0),
    ("restart_jitter", -0.01), ("restart_jitter", 1.5),
    ("flap_max_restarts", 0), ("flap_window", 0),
    ("memory_limit_mb", -1), ("memory_limit_mb", "1G"),
    ("max_calls", -1), ("max_calls", False),
    ("sink_window_mb", 0), ("sink_window_mb", 20000), ("sink_max_deliveries", 0),
    ("control_lost_timeout", 0), ("dial_timeout", -5),
    ("log_level", "TRACE"), ("log_level", 10),
    ("metrics_address", "0.0.0.0:9100"), ("metrics_address", 9100),
    ("runtime_dir", ["/tmp"]),
]


@pytest.mark.parametrize("key, bad", BAD)
def test_validator_rejects_bad_override(key, bad):
    with pytest.raises(ConfigError) as e:
        load_settings(overrides={key: bad}, environ={})
    assert_one_line(e.value, f"{key} must be ", f"got {bad!r} from overrides")


def test_bad_value_in_file_names_the_file(tmp_path):
    path = write(tmp_path / "kuiper_pool.yaml", "heartbeat_interval: -1\n")
    with pytest.raises(ConfigError) as e:
        load_settings(str(tmp_path), environ={})
    assert str(e.value) == f"kuiper_pool config: heartbeat_interval must be a number >= 0.05 and <= 3600 (got -1 from {path})"


@pytest.mark.parametrize("key, text", [
    ("heartbeat_interval", "abc"), ("heartbeat_interval", "-1"), ("heartbeat_misses", "2.5"),
    ("sink_window_mb", ""), ("restart_jitter", "2"), ("start_method", "thread"), ("metrics_address", "10.0.0.1:80"),
])
def test_bad_env_value_names_the_variable(key, text):
    var = "KUIPER_POOL_" + key.upper()
    with pytest.raises(ConfigError) as e:
        load_settings(environ={var: text})
    assert_one_line(e.value, f"{key} must be ", f"got {text!r} from environment variable {var}")


def test_env_number_and_string_coercion():
    s = load_settings(environ={
        "KUIPER_POOL_HEARTBEAT_INTERVAL": " 0.25 ", "KUIPER_POOL_HEARTBEAT_MISSES": "7",
        "KUIPER_POOL_MEMORY_LIMIT_MB": "512", "KUIPER_POOL_LOG_LEVEL": "error",
        "KUIPER_POOL_RUNTIME_DIR": "/run/kp", "KUIPER_POOL_START_METHOD": "spawn",
    })
    assert (s.heartbeat_interval, s.heartbeat_misses, s.memory_limit_mb) == (0.25, 7, 512.0)
    assert type(s.heartbeat_misses) is int and type(s.memory_limit_mb) is float
    assert (s.log_level, s.runtime_dir, s.start_method) == ("ERROR", "/run/kp", "spawn")


@pytest.mark.parametrize("text, value", [
    ("true", True), ("TRUE", True), ("1", True), ("false", False), (" False ", False), ("0", False),
])
def test_env_bool_coercion(text, value):
    flag = Setting("flag", "workers", bool, False, "true or false", "A flag.")
    assert flag.parse(text, "environment variable KUIPER_POOL_FLAG") is value


@pytest.mark.parametrize("text", ["yes", "", "2", "truee"])
def test_env_bool_coercion_rejects(text):
    flag = Setting("flag", "workers", bool, False, "true or false", "A flag.")
    with pytest.raises(ConfigError) as e:
        flag.parse(text, "environment variable KUIPER_POOL_FLAG")
    assert_one_line(e.value, "flag must be true or false", "KUIPER_POOL_FLAG")


@pytest.mark.parametrize("addr", [
    "", "127.0.0.1:9100", "127.8.9.10:1", "localhost:65535", "[::1]:9100", "::1:9100",
])
def test_metrics_address_accepts_loopback(addr):
    assert load_settings(overrides={"metrics_address": addr}, environ={}).metrics_address == addr


@pytest.mark.parametrize("addr", [
    "0.0.0.0:9100", "10.0.0.1:9100", "example.com:80", "[::]:9100", "127.0.0.1", "127.0.0.1:",
    "127.0.0.1:0", "127.0.0.1:65536", "localhost:http", ":9100", "127.0.0.1:-1", "localhost :9100",
])
def test_metrics_address_rejects_non_loopback_or_bad_port(addr):
    with pytest.raises(ConfigError) as e:
        load_settings(overrides={"metrics_address": addr}, environ={})
    assert_one_line(e.value, "metrics_address must be ", repr(addr))


def test_backoff_max_below_min_rejected(tmp_path):
    path = write(tmp_path / "kuiper_pool.yaml", "restart_backoff_min: 2\n")
    with pytest.raises(ConfigError) as e:
        load_settings(str(tmp_path), overrides={"restart_backoff_max": 1}, environ={})
    assert_one_line(e.value, "restart_backoff_max must be >= restart_backoff_min", "overrides", path)
    s = load_settings(overrides={"restart_backoff_min": 3, "restart_backoff_max": 3}, environ={})
    assert s.restart_backoff_min == s.restart_backoff_max == 3.0


# --- unknown keys and bad files ---------------------------------------------------------------

def test_unknown_key_in_file_suggests_closest(tmp_path):
    path = write(tmp_path / "kuiper_pool.yaml", "heartbeat_intervl: 1\n")
    with pytest.raises(ConfigError) as e:
        load_settings(str(tmp_path), environ={})
    assert_one_line(e.value, "unknown setting heartbeat_intervl", path, "did you mean heartbeat_interval?")


def test_unknown_override_suggests_closest():
    with pytest.raises(ConfigError) as e:
        load_settings(overrides={"sink_window_mbs": 5}, environ={})
    assert_one_line(e.value, "unknown setting sink_window_mbs", "overrides", "did you mean sink_window_mb?")


def test_unknown_key_without_close_match():
    with pytest.raises(ConfigError) as e:
        load_settings(overrides={"zzz": 5}, environ={})
    assert_one_line(e.value, "unknown setting zzz")
    assert "did you mean" not in str(e.value)


def test_an_unknown_env_var_is_a_warning_that_suggests_the_closest():
    # eKuiper's environment is every plugin's: a variable another kuiper_pool version knows
    # (after a rollback) must not stop them all
    import kuiper_pool

    warned: List[str] = []
    s = load_settings(environ={"KUIPER_POOL_DIAL_TIMOUT": "3", "KUIPER_POOL_STOP_GRACE": "2"},
                      warn=warned.append)
    assert s.stop_grace == 2.0 and s.dial_timeout == 5.0
    assert warned == [f"kuiper_pool config: ignoring environment variable KUIPER_POOL_DIAL_TIMOUT: "
                      f"not a setting of kuiper_pool {kuiper_pool.__version__}; did you mean "
                      f"KUIPER_POOL_DIAL_TIMEOUT?"]


def test_a_plugin_starts_with_an_unknown_env_var_and_logs_a_warning(tmp_path, unique, host_runs):
    pd = make_plugin(str(tmp_path), f"kp{unique}", functions={f"fn{unique}": MODE_FUNCTION})
    host = host_runs.launch(pd, env={"KUIPER_POOL_FROM_A_NEWER_VERSION": "1"})
    assert host.start_function(f"fn{unique}").exec(["echo", 1])["result"] == 1
    log = open(os.path.join(pd, "stdout.log")).read()
    assert (f"WARNING kuiper_pool plugin=kp{unique} symbol=- rule=- pid={host.process.pid}: plugin "
            f"kp{unique}: kuiper_pool config: ignoring environment variable "
            f"KUIPER_POOL_FROM_A_NEWER_VERSION: not a setting of kuiper_pool") in log


@pytest.mark.parametrize("text, kind", [("- stop_grace\n", "list"), ("just a string\n", "str"), ("3\n", "int")])
def test_non_mapping_yaml_rejected(tmp_path, text, kind):
    path = write(tmp_path / "kuiper_pool.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_settings(str(tmp_path), environ={})
    assert_one_line(e.value, path, "must be a mapping", kind)


def test_malformed_yaml_is_one_line_error(tmp_path):
    path = write(tmp_path / "kuiper_pool.yaml", "stop_grace: [1,\nlog_level: INFO\n")
    with pytest.raises(ConfigError) as e:
        load_settings(str(tmp_path), environ={})
    assert_one_line(e.value, "cannot read", path)


# --- rendered defaults file -------------------------------------------------------------------

def test_repo_file_equals_rendering():
    with open(REPO_FILE, encoding="utf-8") as f:
        assert f.read() == render_defaults_yaml(), "regenerate config/kuiper_pool.yaml from render_defaults_yaml()"


def test_rendering_parses_back_to_defaults(tmp_path):
    text = render_defaults_yaml()
    parsed = yaml.safe_load(text)
    assert list(parsed) == [s.name for s in SETTINGS] + ["symbols"]
    assert parsed == {**DEFAULTS, "symbols": {}}
    assert all(type(parsed[s.name]) is s.type for s in SETTINGS)
    write(tmp_path / "kuiper_pool.yaml", text)
    assert load_settings(str(tmp_path), environ={}) == Settings(**DEFAULTS)


def test_rendering_documents_every_setting():
    text = render_defaults_yaml()
    for section in config.SECTIONS:
        assert f"# ==== {section}: " in text
    for s in SETTINGS:
        block = text.split(f"\n{s.name}: ")[0].rsplit("\n\n", 1)[1]
        assert block.startswith("# ") and f"Must be {s.expected}." in " ".join(block.replace("# ", "").split())


# --- per-symbol policy ---------------------------------------------------------------------------

def test_a_symbol_overrides_per_instance_settings_for_its_instances_only(tmp_path):
    (tmp_path / "kuiper_pool.yaml").write_text(
        "call_deadline: 3\nsymbols:\n  heavy:\n    call_deadline: 10\n    memory_limit_mb: 2048\n")
    s = load_settings(str(tmp_path), environ={})
    heavy, other = s.for_symbol("heavy"), s.for_symbol("light")
    assert (heavy.call_deadline, heavy.memory_limit_mb) == (10.0, 2048.0)
    assert (other.call_deadline, other.memory_limit_mb) == (3.0, 0.0)
    assert other is s


def test_symbols_can_come_from_code_overrides():
    s = load_settings(overrides={"symbols": {"fn": {"max_calls": 7}}}, environ={})
    assert s.for_symbol("fn").max_calls == 7 and s.max_calls == 0


@pytest.mark.parametrize("symbols, message", [
    ({"heavy": {"log_level": "DEBUG"}}, "symbols.heavy.log_level is not a per-symbol setting"),
    ({"heavy": {"call_dedline": 3}}, "symbols.heavy.call_dedline is not a setting"),
    ({"heavy": {"call_deadline": -1}}, "symbols.heavy.call_deadline must be a number >= 0.01 and <= 86400 (got -1"),
    ({"heavy": 5}, "symbols.heavy must be a mapping of setting: value"),
    ([1], "symbols must be a mapping of symbol name to settings"),
    ({"heavy": {"restart_backoff_min": 20.0}},
     "symbols.heavy.restart_backoff_max must be >= symbols.heavy.restart_backoff_min"),
])
def test_bad_symbol_settings_fail_in_one_line_naming_the_key_path(symbols, message):
    with pytest.raises(ConfigError) as e:
        load_settings(overrides={"symbols": symbols}, environ={})
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    ({"symbols": {"f": {"heartbeat_misses": int("9" * 401)}}},
     "symbols.f.heartbeat_misses must be an integer >= 1 and <= 1000 (got 9999"),
    ({"heartbeat_interval": 1e-6}, "heartbeat_interval must be a number >= 0.05 and <= 3600 (got 1e-06"),
    ({"stop_grace": int("9" * 401)}, "stop_grace must be a number >= 0.01 and <= 3600"),
    ({"sink_window_mb": 10 ** 7}, "sink_window_mb must be a number >= 1 and <= 16384"),
])
def test_every_number_has_sane_bounds_named_in_one_short_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_settings(overrides=overrides, environ={})
    assert_one_line(e.value, message)
    assert len(str(e.value)) < 200


def test_every_numeric_setting_has_an_upper_bound_in_the_defaults_file():
    for s in SETTINGS:
        if s.type in (int, float):
            assert " and <= " in s.expected, s.name
            assert f"Must be {s.expected}." in " ".join(render_defaults_yaml().replace("# ", "").split())


def test_a_symbols_entry_must_name_a_symbol_of_the_plugin():
    with pytest.raises(ConfigError) as e:
        load_settings(overrides={"symbols": {"heavvy": {"call_deadline": 9}}}, environ={},
                      known_symbols=["heavy", "light"])
    assert_one_line(e.value, "symbols.heavvy names no symbol of the plugin (from overrides; it has "
                             "heavy, light); did you mean heavy?")
    with pytest.raises(ConfigError):
        load_settings(overrides={"symbols": {"heavvy": {}}}, environ={}, known_symbols=["heavy"])
    s = load_settings(overrides={"symbols": {"heavy": {"call_deadline": 9}}}, environ={},
                      known_symbols=["heavy"])
    assert s.for_symbol("heavy").call_deadline == 9.0


OTHER_UID = 65534  # nobody
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="making files of another user needs root")


@pytest.fixture
def trusted(tmp_path):
    """A directory only we can write, with a good settings file in it."""
    good = write(tmp_path / "good.yaml", "call_deadline: 3\n")
    return tmp_path, good


def test_a_settings_file_reached_through_trusted_symlinks_is_read(trusted):
    d, good = trusted
    os.symlink(good, d / "link.yaml")
    assert load_settings(environ={config.CONFIG_ENV: str(d / "link.yaml")}).call_deadline == 3.0


@needs_root
@pytest.mark.parametrize("setup, blamed", [
    # the file another user owns, reached through a symlink
    (lambda d: (os.chown(write(d / "theirs.yaml", "runtime_dir: /x\n"), OTHER_UID, OTHER_UID),
                os.symlink(d / "theirs.yaml", d / "s.yaml")), "theirs.yaml belongs to uid 65534"),
    # a file anyone can write
    (lambda d: (os.chmod(write(d / "open.yaml", ""), 0o666), os.symlink(d / "open.yaml", d / "s.yaml")),
     "open.yaml is writable by others (mode 0666)"),
    # the symlink itself in a directory anyone can write: it can be swapped
    (lambda d: ((d / "pub").mkdir(), os.chmod(d / "pub", 0o777), os.symlink(d / "good.yaml", d / "pub" / "l"),
                os.symlink(d / "pub" / "l", d / "s.yaml")), "pub is writable by others (mode 0777)"),
    # a directory on the way that another user owns
    (lambda d: ((d / "their").mkdir(), write(d / "their" / "k.yaml", ""), os.chown(d / "their", OTHER_UID, 0),
                os.symlink(d / "their" / "k.yaml", d / "s.yaml")), "their belongs to uid 65534"),
])
def test_a_settings_file_others_can_change_is_refused(trusted, setup, blamed):
    d, _good = trusted
    setup(d)
    with pytest.raises(ConfigError) as e:
        load_settings(environ={config.CONFIG_ENV: str(d / "s.yaml")})
    assert_one_line(e.value, f"refusing settings file {d / 's.yaml'}: ", blamed)


@needs_root
def test_the_sticky_tmp_is_trusted_but_not_a_runtime_dir_of_another_user(tmp_path):
    config.check_trusted("/tmp", "runtime_dir")
    (tmp_path / "rt").mkdir()
    os.chown(tmp_path / "rt", OTHER_UID, OTHER_UID)
    with pytest.raises(ConfigError) as e:
        config.check_trusted(str(tmp_path / "rt"), "runtime_dir")
    assert_one_line(e.value, "refusing runtime_dir", "belongs to uid 65534")


def test_symbol_env_is_kept_apart_from_the_settings_it_overrides():
    s = load_settings(overrides={"symbols": {"infer": {"env": {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "0"},
                                                       "call_deadline": 3}}}, environ={})
    assert s.symbol_env() == {"infer": {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "0"}}
    assert s.for_symbol("infer").call_deadline == 3.0
    assert load_settings(overrides={"symbols": {"x": {"env": {}}}}, environ={}).for_symbol("x").call_deadline == 4.0


def test_threads_per_worker_sets_the_math_libraries_thread_variables():
    assert load_settings(environ={}).thread_env()["OPENBLAS_NUM_THREADS"] == "1"
    assert load_settings(environ={}, overrides={"threads_per_worker": 0}).thread_env() == {}


@pytest.mark.parametrize("env", [{"OMP_NUM_THREADS": 1}, ["OMP_NUM_THREADS=1"], {"A=B": "1"}, {"": "1"}])
def test_a_bad_symbol_env_fails_in_one_line_naming_the_key_path(env):
    with pytest.raises(ConfigError) as e:
        load_settings(overrides={"symbols": {"infer": {"env": env}}}, environ={})
    assert "symbols.infer.env must be a mapping of environment variable name to string value" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_plugin_started_elsewhere_than_linux_stops_in_one_line(tmp_path, unique):
    import subprocess
    import sys

    from plugins import REPO

    pd = make_plugin(str(tmp_path), f"kp{unique}", functions={f"fn{unique}": MODE_FUNCTION},
                     main_code="import sys\nsys.platform = 'darwin'  # as on a Mac\n")
    proc = subprocess.run([sys.executable, "main.py"], cwd=pd, stdout=subprocess.PIPE, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 2
    assert proc.stdout.splitlines() == ["kuiper_pool: cannot start: kuiper_pool runs on Linux only "
                                        "(this is darwin): it needs memfd_create, prctl and /proc"]
