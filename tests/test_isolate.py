"""sparse_export.isolate: a function run in a child process; crashes become one-line errors."""

import subprocess

import pytest

from sparse_export import isolate
from sparse_export.errors import UserError


def test_value_comes_back():
    assert isolate.call("json:dumps", {"obj": [1, 2], "indent": None}, "dumping") == "[1, 2]"


def test_user_error_passes_through(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        isolate.call("sparse_export.data:check_source", {"source": str(tmp_path / "none.txt")}, "checking")


def test_segfault_becomes_user_error():
    with pytest.raises(UserError, match=r"^crashing crashed \(SIGSEGV\); try this$"):
        isolate.call("faulthandler:_sigsegv", {}, "crashing", "try this")


def test_deepsparse_crash_report_is_recognised(monkeypatch):
    # DeepSparse catches the signal itself, prints a stack dump and exits 1
    dump = "Received signal: Segmentation fault (signal addr: 0000000000000000)\n 0# 0x7f...\nPlease email ...\n"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, None, dump))
    with pytest.raises(UserError, match=r"engine crashed \(Segmentation fault\)$"):
        isolate.call("json:dumps", {"obj": 1}, "engine")


def test_other_failures_name_the_last_line():
    with pytest.raises(RuntimeError, match=r"exit 1\): TypeError"):
        isolate.call("json:dumps", {"nope": 1}, "dumping")
