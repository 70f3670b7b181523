"""Unit tests of the supervisor's pure decisions: restart backoff and flapping
(health.RestartPolicy) and the kill/recycle verdict on a worker's vitals (health.verdict)."""
from __future__ import annotations

import random

import pytest

from kuiper_pool import wire
from kuiper_pool.config import load_settings
from kuiper_pool.runtime.health import Cause, RestartPolicy, Vitals, restart_kind, verdict

MiB = 1048576


def settings(**overrides):
    # environ={}: KUIPER_POOL_* variables of whoever runs the tests must not leak in
    return load_settings(overrides=overrides, environ={})


def delays(policy: RestartPolicy, times):
    return [policy.next_delay(t) for t in times]


# --- RestartPolicy ---------------------------------------------------------------------------

def test_backoff_starts_at_initial_then_doubles_from_min():
    s = settings(restart_backoff_initial=0.0, restart_backoff_min=0.1, restart_backoff_max=100.0,
                 restart_jitter=0.0, flap_max_restarts=100, flap_window=1000.0)
    got = delays(RestartPolicy(s), range(7))
    assert got == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2])


def test_a_nonzero_initial_delay_is_used_for_the_first_restart_only():
    s = settings(restart_backoff_initial=0.7, restart_backoff_min=0.1, restart_backoff_max=100.0,
                 restart_jitter=0.0, flap_max_restarts=100, flap_window=1000.0)
    assert delays(RestartPolicy(s), range(3)) == pytest.approx([0.7, 0.1, 0.2])


def test_backoff_is_capped_at_max():
    s = settings(restart_backoff_initial=0.0, restart_backoff_min=0.1, restart_backoff_max=0.3,
                 restart_jitter=0.0, flap_max_restarts=100, flap_window=1000.0)
    got = delays(RestartPolicy(s), range(40))
    assert got[:5] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.3])
    assert max(got) == pytest.approx(0.3) and got[-1] == pytest.approx(0.3)


def test_jitter_stays_within_its_fraction_and_is_reproducible_with_a_seed():
    s = settings(restart_backoff_initial=0.5, restart_backoff_min=0.1, restart_backoff_max=0.8,
                 restart_jitter=0.2, flap_max_restarts=1000, flap_window=1e6)
    plain = settings(restart_backoff_initial=0.5, restart_backoff_min=0.1, restart_backoff_max=0.8,
                     restart_jitter=0.0, flap_max_restarts=1000, flap_window=1e6)
    times = range(200)
    bases = delays(RestartPolicy(plain), times)
    got = delays(RestartPolicy(s, random.Random(1234)), times)
    for base, d in zip(bases, got):
        assert base * 0.8 - 1e-12 <= d <= base * 1.2 + 1e-12
    ratios = [d / b for b, d in zip(bases, got)]
    assert min(ratios) < 0.9 and max(ratios) > 1.1  # spread over the whole band, not a constant
    assert len({round(r, 9) for r in ratios}) > 150  # instances do not restart in lockstep
    assert delays(RestartPolicy(s, random.Random(1234)), times) == got
    assert delays(RestartPolicy(s, random.Random(4321)), times) != got


def test_too_many_restarts_within_the_window_means_failed():
    s = settings(restart_backoff_initial=0.0, restart_backoff_min=0.1, restart_backoff_max=1.0,
                 restart_jitter=0.0, flap_max_restarts=3, flap_window=10.0)
    p = RestartPolicy(s)
    assert delays(p, [0.0, 1.0, 2.0]) == pytest.approx([0.0, 0.1, 0.2])
    assert p.next_delay(3.0) is None
    assert p.next_delay(9.9) is None  # still 3 restarts within the last 10 s


def test_restarts_older_than_the_window_stop_counting():
    s = settings(restart_backoff_initial=0.0, restart_backoff_min=0.1, restart_backoff_max=1.0,
                 restart_jitter=0.0, flap_max_restarts=3, flap_window=10.0)
    p = RestartPolicy(s)
    delays(p, [0.0, 1.0, 2.0])
    assert p.next_delay(10.0) is None       # the one at 0.0 is exactly 10 s old: still inside
    assert p.next_delay(10.5) == pytest.approx(0.2)  # it expired: 2 left, so this is the 3rd
    assert p.next_delay(10.6) is None       # 1.0, 2.0 and 10.5 are within the window
    assert p.next_delay(12.1) == pytest.approx(0.1)  # 1.0 and 2.0 expired: only 10.5 counts
    # after a long quiet period the backoff starts from the beginning again
    assert p.next_delay(1000.0) == pytest.approx(0.0)
    assert p.next_delay(1000.5) == pytest.approx(0.1)


# --- verdict ---------------------------------------------------------------------------------

VERDICT = dict(heartbeat_interval=0.5, heartbeat_misses=4, call_deadline=2.0,
               memory_limit_mb=0.0, max_calls=0)


FUNC, SINK, SOURCE = wire.TYPE_FUNC, wire.TYPE_SINK, wire.TYPE_SOURCE


def NO_CPU():  # noqa: N802 - reads like the constant it stands for
    return None


def vitals(now: float, **kw) -> Vitals:
    return Vitals(last_beat=kw.pop("last_beat", now), **kw)


@pytest.mark.parametrize("kind", [wire.TYPE_FUNC, wire.TYPE_SINK, wire.TYPE_SOURCE])
def test_missed_heartbeats_mean_hung_for_every_kind(kind):
    s = settings(**VERDICT)  # limit 0.5 * 4 = 2 s
    assert verdict(vitals(100.0, last_beat=98.1), 100.0, s, kind, NO_CPU) is None
    cause, why = verdict(vitals(100.0, last_beat=97.5), 100.0, s, kind, NO_CPU)
    assert cause is Cause.HANG and cause.kills and why.startswith("hung: no heartbeat for 2.5s (limit 2.0s)")


def test_a_call_past_its_deadline_is_killed():
    s = settings(**VERDICT)
    assert verdict(vitals(100.0, call_started=98.5), 100.0, s, FUNC, NO_CPU) is None
    kind, why = verdict(vitals(100.0, call_started=97.9), 100.0, s, FUNC, NO_CPU)
    assert (kind, why) == (Cause.DEADLINE, "call exceeded call_deadline 2s")


def test_a_sink_collect_past_collect_deadline_is_killed():
    s = settings(**VERDICT, collect_deadline=2.0)
    assert verdict(vitals(100.0, busy_since=98.5), 100.0, s, SINK, NO_CPU) is None
    assert verdict(vitals(100.0, busy_since=97.0), 100.0, s, SINK, NO_CPU) == (
        Cause.DEADLINE, "call exceeded collect_deadline 2s")


def test_a_slow_sink_collect_is_left_alone_by_default():
    s = settings(**VERDICT)  # collect_deadline 0: eKuiper imposes no limit on sinks
    assert verdict(vitals(100.0, busy_since=1.0), 100.0, s, SINK, NO_CPU) is None


def test_a_source_busy_for_long_is_not_killed_while_it_beats():
    s = settings(**VERDICT)
    assert verdict(vitals(10000.0, busy_since=1.0, call_started=1.0), 10000.0, s, SOURCE, NO_CPU) is None


def test_memory_over_the_limit_recycles():
    s = settings(**{**VERDICT, "memory_limit_mb": 100.0})
    assert verdict(vitals(100.0, rss=100 * MiB), 100.0, s, FUNC, NO_CPU) is None
    kind, why = verdict(vitals(100.0, rss=150 * MiB), 100.0, s, FUNC, NO_CPU)
    assert (kind, why) == (Cause.MEMORY, "resident memory 150 MiB over memory_limit_mb 100")
    assert not kind.kills
    assert verdict(vitals(100.0, rss=150 * MiB), 100.0, s, SOURCE, NO_CPU)[0] is Cause.MEMORY  # sources too
    off = settings(**VERDICT)
    assert verdict(vitals(100.0, rss=10 ** 12), 100.0, off, FUNC, NO_CPU) is None


def test_max_calls_recycles_after_n_calls():
    s = settings(**{**VERDICT, "max_calls": 5})
    assert verdict(vitals(100.0, calls=4), 100.0, s, FUNC, NO_CPU) is None
    assert verdict(vitals(100.0, calls=5), 100.0, s, FUNC, NO_CPU) == (Cause.MAX_CALLS, "served max_calls 5")
    assert verdict(vitals(100.0, calls=10 ** 6), 100.0, settings(**VERDICT), FUNC, NO_CPU) is None


def test_a_hung_worker_is_killed_rather_than_recycled():
    s = settings(**{**VERDICT, "memory_limit_mb": 100.0, "max_calls": 5})
    v = vitals(100.0, last_beat=90.0, rss=500 * MiB, calls=50, call_started=50.0)
    assert verdict(v, 100.0, s, FUNC, NO_CPU)[0] is Cause.HANG
    v = vitals(100.0, rss=500 * MiB, calls=50, call_started=50.0)
    assert verdict(v, 100.0, s, FUNC, NO_CPU) == (Cause.DEADLINE, "call exceeded call_deadline 2s")


# --- hung means silent and idle; busy on the CPU is not hung -----------------------------------

def test_a_silent_worker_burning_cpu_is_busy_not_hung():
    s = settings(**VERDICT)  # limit 2 s
    v = vitals(100.0, last_beat=97.0, cpu_at_beat=5.0)
    assert verdict(v, 100.0, s, SOURCE, lambda: 7.5) is None  # 2.5 CPU-s in 3 s of silence


def test_a_silent_idle_worker_is_hung_and_the_reason_says_so():
    s = settings(**VERDICT)
    v = vitals(100.0, last_beat=97.0, cpu_at_beat=5.0)
    cause, why = verdict(v, 100.0, s, SOURCE, lambda: 5.01)
    assert cause is Cause.HANG
    assert why == "hung: no heartbeat for 3.0s (limit 2.0s) and 0.01s of CPU in the last 3.0s"


def test_a_busy_worker_that_then_stops_is_hung_at_the_limit_not_a_window_later():
    s = settings(**VERDICT)  # limit 2 s; the CPU is watched from the first late beat
    v = vitals(100.0, last_beat=100.0, cpu_at_beat=5.0)
    assert verdict(v, 100.4, s, SINK, lambda: 5.4) is None    # beats on time: nothing read
    assert v.cpu_mark is None
    assert verdict(v, 100.55, s, SINK, lambda: 5.5) is None   # late; it ran until now
    assert v.cpu_mark == (100.55, 5.5)
    assert verdict(v, 101.5, s, SINK, lambda: 5.5) is None    # stopped, but not silent for 2 s
    cause, why = verdict(v, 102.05, s, SINK, lambda: 5.5)    # SIGSTOP right after a beat
    assert cause is Cause.HANG and "0.00s of CPU in the last 1.5s" in why


def test_a_silent_worker_that_keeps_using_cpu_is_never_hung():
    s = settings(**VERDICT)
    v = vitals(100.0, last_beat=100.0, cpu_at_beat=5.0)
    for tick in range(1, 200):  # a C call holding the GIL for 10 s
        now = 100.0 + tick * 0.05
        assert verdict(v, now, s, SINK, lambda: 5.0 + tick * 0.05) is None


def test_without_a_cpu_reading_silence_alone_decides():
    s = settings(**VERDICT)
    assert verdict(vitals(100.0, last_beat=97.0), 100.0, s, SOURCE, NO_CPU)[0] is Cause.HANG


def test_a_first_cpu_reading_without_a_baseline_waits_one_window():
    s = settings(**VERDICT)
    v = vitals(100.0, last_beat=97.0)  # the worker's beats carried no CPU figure
    assert verdict(v, 100.0, s, SOURCE, lambda: 3.0) is None
    assert verdict(v, 102.1, s, SOURCE, lambda: 3.0)[0] is Cause.HANG


def test_the_restart_cause_label_comes_from_the_kill_cause_not_from_its_text():
    assert restart_kind(Cause.HANG, True) == "hang"
    assert restart_kind(Cause.DEADLINE, True) == restart_kind(Cause.START_TIMEOUT, False) == "deadline"
    assert restart_kind(Cause.NO_CHANNEL, True) == restart_kind(None, True) == "signal"
    assert restart_kind(None, False) == "exit"
