"""The command line as a user meets it: help that reads well, SIGTERM handled like Ctrl-C, fast and
honest errors when a model or data source cannot be had."""

import os
import signal
import subprocess
import sys
import time

import pytest

from sparse_export.cli.main import main
from sparse_export.runtimes import RUNTIMES


def _run(args, env=None, **kw):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "sparse_export.cli.main", *args], capture_output=True, text=True,
                          env=env, **kw)


@pytest.mark.parametrize("command", [["--help"], ["prune", "--help"], ["prune-and-export", "--help"],
                                     ["benchmark", "--help"], ["export", "onnx", "--help"]])
def test_help_reads_well(command, capsys):
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "<bool>" not in out and "{model}" not in out and "[default: None]" not in out
    if command != ["--help"]:
        assert "Usage: sparse-export" in out and ("MODEL" in out or "[OPTIONS] COMMAND" in out)


def test_help_and_errors_list_the_same_runtimes(capsys):
    assert main(["benchmark", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert main(["benchmark", ".", "--runtime", "tvm"]) == 2
    err = capsys.readouterr().err
    for name in RUNTIMES:
        assert name in help_text and name in err


def test_sigterm_cleans_up_like_ctrl_c(tiny_dirs, text_file, tmp_path):
    """SIGTERM during a prune: one line, exit 143, nothing left beside --out."""
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "sparse_export.cli.main", "prune", str(tiny_dirs["llama"]),
                             "--out", str(out), "--calib", "self", "--nsamples", "8", "--seqlen", "2000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(out.parent.iterdir()):   # the temporary folder appears
        time.sleep(0.05)
    assert list(out.parent.iterdir()), "the prune never started"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line and "step (" not in line]
    assert lines[-1] == "error: terminated (SIGTERM); nothing was written"
    assert list(out.parent.iterdir()) == []


def test_a_local_looking_path_that_does_not_exist_fails_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo-out").mkdir()
    t = time.monotonic()
    rc = main(["prune", "demo-out/pruned-modle", "--out", "o", "--method", "magnitude"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == "error: model not found: no such file or folder: demo-out/pruned-modle"
    assert time.monotonic() - t < 5 and not (tmp_path / "o").exists()


def test_offline_hub_fails_fast_in_one_line(tmp_path):
    """A hub id with the hub unreachable (a closed local port as the endpoint): one line, no retries."""
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    t = time.monotonic()
    r = _run(["prune", "some-org/some-model", "--out", str(tmp_path / "o"), "--method", "magnitude"], env=env)
    wall = time.monotonic() - t
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "not reachable" in lines[0] and "local model folder" in lines[0]
    assert wall < 15 and not (tmp_path / "o").exists()   # interpreter start included; the check itself is < 5 s


def test_hub_data_source_is_checked_before_the_model_loads(tiny_dirs, tmp_path):
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    r = _run(["prune-and-export", str(tiny_dirs["llama"]), "--out", str(tmp_path / "o"), "--calib", "c4"], env=env)
    assert r.returncode == 2 and "'c4' needs the Hugging Face hub" in r.stderr
    assert "loading" not in r.stdout and not (tmp_path / "o").exists()
