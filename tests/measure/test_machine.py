"""How far to trust a timing: busy machine, steal and spread produce warnings; a quiet run none."""

import pytest

from sparse_export.errors import EngineCrash
from sparse_export.measure import machine
from sparse_export.measure.prefill import with_crash_policy


def _snap(t, busy, steal, total, own, load=0.1):
    return {"time": t, "load1": load, "jiffies": (busy, steal, total), "own_cpu_s": own}


def test_quiet_run_has_no_warnings(monkeypatch):
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(machine.os, "sysconf", lambda name: 100)
    # 10 s wall on 2 cores; the machine was busy 10 core-seconds (1000 jiffies), all of it ours
    t = machine.trust(_snap(0, 0, 0, 0, 0), _snap(10, 1000, 0, 2000, 10), [{"p90_ms": 11, "min_ms": 10}])
    assert t["warnings"] == [] and t["others_busy"] == pytest.approx(0) and t["spread_p90_over_min"] == 1.1
    assert machine.trust_line(t).startswith("Timing conditions:")


def test_busy_machine_steal_and_spread_warn(monkeypatch):
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(machine.os, "sysconf", lambda name: 100)
    # other processes used 8 of the 20 core-seconds (40%), the hypervisor stole 10% of the time
    t = machine.trust(_snap(0, 0, 0, 0, 0, load=5), _snap(10, 1800, 200, 2000, 10, load=6),
                      [{"p90_ms": 30, "min_ms": 10}])
    assert t["others_busy"] == pytest.approx(0.4) and t["steal"] == pytest.approx(0.1)
    assert len(t["warnings"]) == 3 and "3.00x" in t["warnings"][2]
    assert machine.trust_line(t).startswith("WARNING") and "Rerun on a quiet machine" in machine.trust_line(t)


def test_a_real_snapshot_reads_proc():
    s = machine.snapshot()
    assert s["jiffies"] is None or s["jiffies"][2] > 0
    t = machine.trust(s, machine.snapshot(), [])
    assert t["spread_p90_over_min"] is None and "warnings" in t


def test_crash_policy():
    calls, crashes = [], []

    def crashing(times):
        def measure(args):
            calls.append(args["threads"])
            if len(calls) <= times:
                raise EngineCrash("engine crashed (SIGSEGV)")
            return [{"model": "m"}]
        return measure

    with pytest.raises(EngineCrash):
        with_crash_policy(crashing(1), {"threads": None}, "deepsparse", ["m"], "raise", crashes, print)
    calls.clear()
    rows = with_crash_policy(crashing(1), {"threads": None}, "deepsparse", ["m"], "record", crashes, lambda *_: None)
    assert calls == [None, 1] and rows[0]["threads"] == 1 and "passed with one thread" in crashes[-1]["retry"]
    calls.clear()
    assert with_crash_policy(crashing(2), {"threads": 2}, "deepsparse", ["m"], "record", crashes,
                             lambda *_: None) == []
    assert calls == [2, 1] and "crashed again" in crashes[-1]["retry"]
    calls.clear()
    assert with_crash_policy(crashing(1), {"threads": 1}, "deepsparse", ["m"], "record", crashes,
                             lambda *_: None) == []
    assert calls == [1] and crashes[-1]["retry"].startswith("none")
