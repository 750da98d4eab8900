"""`generate` and `benchmark` with a crashing engine (DeepSparse 1.8 on a tiny grouped-query Llama's KV-cache
graph with 2 threads): the engine runs in a child process, a crash is retried once on one thread, and what
the user sees is one line, not the engine's stack dump."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_export.errors import EngineCrash
from sparse_export.measure.prefill import with_crash_policy
from sparse_export.runtimes import generate as gen

ROOT = Path(__file__).resolve().parents[2]


def _fake_call(crashes: int, seen: list):
    """isolate.call that crashes for the first `crashes` calls, then returns stats."""
    def call(target, kwargs, what, hint="", child=True, stdout=False):
        seen.append(kwargs["threads"])
        if len(seen) <= crashes:
            raise EngineCrash(f"{what} crashed (SIGSEGV); {hint}")
        return {"new_tokens": 3}
    return call


def test_generate_retries_once_on_one_thread(monkeypatch):
    seen, logged = [], []
    monkeypatch.setattr(gen.isolate, "call", _fake_call(1, seen))
    stats = gen.generate_text_isolated("kv", "hi", 3, threads=2, log=logged.append)
    assert seen == [2, 1] and stats["note"].startswith("rerun with one thread") and len(logged) == 1
    seen.clear()
    monkeypatch.setattr(gen.isolate, "call", _fake_call(2, seen))
    with pytest.raises(EngineCrash, match=r"crashed \(SIGSEGV\).*then again with one\)$"):
        gen.generate_text_isolated("kv", "hi", 3, threads=None, log=lambda m: None)
    assert seen == [None, 1]
    seen.clear()
    with pytest.raises(EngineCrash):                       # already one thread: no retry
        gen.generate_text_isolated("kv", "hi", 3, threads=1, log=lambda m: None)
    assert seen == [1]


def test_benchmark_crash_policy_retry():
    calls = []

    def measure(args, fail=(True,)):
        calls.append(args["threads"])
        if len(calls) <= len(fail) and fail[len(calls) - 1]:
            raise EngineCrash("engine crashed (SIGSEGV)")
        return [{"model": "m", "threads": args["threads"]}]

    crashes = []
    rows = with_crash_policy(measure, {"threads": 4}, "deepsparse", ["m"], "retry", crashes, lambda m: None)
    assert calls == [4, 1] and rows[0]["threads"] == 1 and "one thread" in crashes[0]["retry"]
    calls.clear()
    with pytest.raises(EngineCrash, match="then again with one"):
        with_crash_policy(lambda a: measure(a, (True, True)), {"threads": 4}, "deepsparse", ["m"], "retry", [],
                          lambda m: None)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepsparse") is None, reason="DeepSparse is not installed")
def test_cli_generate_and_benchmark_survive_the_deepsparse_crash(tmp_path, tokenizer):
    from sparse_export.cli.main import main
    from tests.tiny import save_tiny

    save_tiny("llama", tmp_path / "m", tokenizer)          # 4 query heads, 2 KV heads
    assert main(["export", "onnx", str(tmp_path / "m"), "--out", str(tmp_path / "kv"), "--kv-cache",
                 "--max-length", "48"]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "sparse_export.cli.main"]
    runs = {
        "generate": cli + ["generate", str(tmp_path / "kv"), "the model prunes", "--runtime", "deepsparse",
                           "--threads", "2", "--max-new-tokens", "4"],
        "benchmark": cli + ["benchmark", str(tmp_path / "kv"), "--mode", "generate", "--runtime", "deepsparse",
                            "--threads", "2", "--prompt-tokens", "8", "--new-tokens", "4", "--warmup", "0",
                            "--iterations", "1"],
    }
    for name, argv in runs.items():
        p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        err = [line for line in p.stderr.splitlines() if line.strip()]
        assert "Traceback" not in p.stderr and "Received signal" not in p.stderr, (name, p.stderr)
        if p.returncode == 0:      # crashed with 2 threads, passed on one: one warning line
            crash = [line for line in err if "crashed" in line]
            if crash:
                assert len(crash) == 1 and crash[0].startswith("warning: ") and "retrying" in crash[0]
            assert ("decode tok/s" in p.stdout) if name == "benchmark" else p.stdout.strip()
        else:                      # crashed on one thread too: one error line
            assert p.returncode == 2 and err[-1].startswith("error: ") and "then again with one" in err[-1]
