"""Streamed prune and eval (layer by layer from safetensors shards) against the in-memory paths, resume
after a SIGKILL, bad input, devices."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sparse_export import data, models
from sparse_export.checkpoints import INDEX_FILE
from sparse_export.cli.main import main
from sparse_export.evaluate import perplexity, stream_perplexity
from sparse_export.layerwise import pick_device
from sparse_export.pruning.driver import prune_model
from sparse_export.pruning.jobs import prune
from sparse_export.pruning.recipe import Recipe
from sparse_export.pruning.stream import STATE_FILE, stream_prune, work_dir
from tests.tiny import ARCHS, tiny_config

ROOT = Path(__file__).resolve().parents[2]


def quiet(*_):
    pass


def recipe(text_file, **kw):
    return Recipe(calib=str(text_file), nsamples=4, seqlen=32, **kw)


def save_sharded(arch, folder, tokenizer, layers=2, tie=None):
    """A tiny random model saved in several shards (with model.safetensors.index.json)."""
    cfg = tiny_config(arch, len(tokenizer))
    cfg.num_hidden_layers = layers
    if tie is not None:
        cfg.tie_word_embeddings = tie
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(folder, max_shard_size="60KB")
    tokenizer.save_pretrained(folder)
    assert (folder / INDEX_FILE).exists() and len(list(folder.glob("*.safetensors"))) > 2
    return folder


def state_dict(folder):
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def assert_same_weights(a, b):
    A, B = state_dict(a), state_dict(b)
    assert A.keys() == B.keys()
    for k in A:
        assert torch.equal(A[k], B[k]), k


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("sharded")
    return {a: save_sharded(a, root / a, tokenizer) for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_prune_equals_in_memory(arch, sharded, text_file, tmp_path):
    """Same code per layer, same inputs, same order of float operations: equal bit for bit."""
    r = recipe(text_file)
    prune(sharded[arch], tmp_path / "mem", r, stream=False, log=quiet)
    meta = prune(sharded[arch], tmp_path / "str", r, stream=True, log=quiet)
    assert_same_weights(tmp_path / "mem", tmp_path / "str")
    out = tmp_path / "str"
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((out / s).exists() for s in shards) and shards[0].endswith("-of-%05d.safetensors" % len(shards))
    saved = json.loads((out / "sparse_export.json").read_text())
    assert saved["streamed"] is True and saved["device"] == "cpu" and saved["peak_memory_gib"] > 0
    assert len(saved["layers"]) == 2 and {"forward_s", "factor_s", "sweep_s", "hessian_s"} <= set(saved["layers"][0])
    assert meta["matrices"].keys() == json.loads((tmp_path / "mem" / "sparse_export.json").read_text())["matrices"].keys()
    assert not work_dir(out).exists()
    # tensors outside the decoder layers are copied through unchanged
    src = {}
    for f in sharded[arch].glob("*.safetensors"):
        src.update(load_file(f))
    dst = {}
    for f in shards:
        dst.update(load_file(out / f))
    assert src.keys() == dst.keys()
    layer_prefix = models.archs.arch_of(AutoModelForCausalLM.from_pretrained(out)).layers + "."
    for k in src:
        if not k.startswith(layer_prefix):
            assert torch.equal(src[k], dst[k]), k


def test_two_pass_spilled_to_file_equals_in_memory(sharded, tokenizer, text_file, tmp_path):
    """Chunked two-pass calibration with the hidden states in a file (budget 0) equals the in-memory
    two-pass driver with the same chunks."""
    r = recipe(text_file)
    calib = data.calibration_windows(text_file, tokenizer, 4, 32, 0)
    model = AutoModelForCausalLM.from_pretrained(sharded["llama"]).eval()
    prune_model(model, calib, r, batch=2, progress=False, one_pass=False)
    meta = stream_prune(sharded["llama"], tmp_path / "s", r, one_pass=False, batch=2, activation_budget=0,
                        progress=False, log=quiet)
    assert meta["activations"] == "file" and meta["calibration_mode"] == "two-pass"
    got = state_dict(tmp_path / "s")
    for k, v in model.state_dict().items():
        assert torch.equal(v, got[k]), k


def test_tied_embeddings_sharded_round_trip(tokenizer, text_file, tmp_path):
    src = save_sharded("llama", tmp_path / "tied", tokenizer, tie=True)
    keys = set(json.loads((src / INDEX_FILE).read_text())["weight_map"])
    assert "lm_head.weight" not in keys
    prune(src, tmp_path / "mem", recipe(text_file), stream=False, log=quiet)
    prune(src, tmp_path / "out", recipe(text_file), stream=True, log=quiet)
    assert set(json.loads((tmp_path / "out" / INDEX_FILE).read_text())["weight_map"]) == keys
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert_same_weights(tmp_path / "mem", tmp_path / "out")


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def one_line_error(code, err):
    lines = [x for x in err.strip().splitlines() if x.strip()]
    return code != 0 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err


def test_bad_inputs_one_line_nothing_left(sharded, text_file, tmp_path, capsys):
    import shutil

    base = ["--stream", "--calib", text_file, "--nsamples", "2", "--seqlen", "32"]
    out = tmp_path / "o"
    # pickled weights only
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(sharded["llama"] / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    code, err = run_cli(["prune", pickled, "--out", out] + base, capsys)
    assert one_line_error(code, err) and "pickled" in err
    # a shard named in the index is missing
    missing = tmp_path / "missing"
    shutil.copytree(sharded["llama"], missing)
    gone = sorted(missing.glob("model-*.safetensors"))[1]
    gone.unlink()
    code, err = run_cli(["prune", missing, "--out", out] + base, capsys)
    assert one_line_error(code, err) and gone.name in err
    for stream in ("--stream", "--no-stream"):   # checked by name on both paths
        code, err = run_cli(["eval", missing, stream, "--data", text_file, "--seqlen", "32"], capsys)
        assert one_line_error(code, err) and gone.name in err
    code, err = run_cli(["prune", missing, "--out", out] + base[1:], capsys)
    assert one_line_error(code, err) and gone.name in err
    # an offload location that cannot be written (a path under a plain file: refused even as root)
    (tmp_path / "file").write_text("x")
    code, err = run_cli(["prune", sharded["llama"], "--out", out, "--offload", tmp_path / "file" / "sub"] + base,
                        capsys)
    assert one_line_error(code, err) and "cannot write" in err
    if not torch.cuda.is_available():
        code, err = run_cli(["prune", sharded["llama"], "--out", out, "--device", "cuda"] + base, capsys)
        assert one_line_error(code, err) and "CUDA" in err
        code, err = run_cli(["eval", sharded["llama"], "--device", "cuda:0", "--data", text_file, "--seqlen", "32"],
                            capsys)
        assert one_line_error(code, err) and "CUDA" in err
    assert not out.exists() and not work_dir(out).exists()
    assert not list(tmp_path.glob(".o*"))


def test_small_folders_load_in_memory_by_default(sharded, tmp_path, monkeypatch):
    from sparse_export import checkpoints

    assert not checkpoints.streamable(sharded["llama"])
    monkeypatch.setattr(checkpoints, "STREAM_ABOVE", 0)
    assert checkpoints.streamable(sharded["llama"]) and not checkpoints.streamable(sharded["llama"], calib="self")


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(Exception, match="device"):
        pick_device("tpu")


# -- resume after a SIGKILL

_CHILD = """
import sys, time
from sparse_export.cli.main import main
from sparse_export.pruning import stream

write = stream._write_state
def stall(work, state):   # after layer 1 is recorded, wait to be killed
    write(work, state)
    if state["done"] == 1:
        open(str(work) + "-layer1", "w").close()
        time.sleep(120)
stream._write_state = stall
sys.exit(main(sys.argv[1:]))
"""


def kill_after_layer_one(args, out):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD] + [str(a) for a in args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    flag = Path(str(work_dir(out)) + "-layer1")
    deadline = time.time() + 120
    while not flag.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert flag.exists(), "the child never finished layer 1"
    flag.unlink()


def folder_files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "sparse_export.json"}


@pytest.mark.parametrize("budget", [None, "0"])
def test_resume_after_sigkill_is_bit_identical(budget, tokenizer, text_file, tmp_path, capsys):
    src = save_sharded("llama", tmp_path / "src", tokenizer, layers=3)
    # one thread in every process: the float sums (and so the bits) depend on the thread count
    args = ["prune", src, "--stream", "--threads", "1", "--calib", text_file, "--nsamples", "4", "--seqlen", "32"]
    if budget is not None:
        args += ["--activation-budget", budget]
    code, _ = run_cli(args + ["--out", tmp_path / "whole"], capsys)
    assert code == 0
    out = tmp_path / "cut"
    kill_after_layer_one(args + ["--out", out], out)
    assert not out.exists() and json.loads((work_dir(out) / STATE_FILE).read_text())["done"] == 1
    code, _ = run_cli(args + ["--out", out, "--resume"], capsys)
    assert code == 0 and not work_dir(out).exists()
    assert folder_files(out) == folder_files(tmp_path / "whole")
    a, b = (json.loads((f / "sparse_export.json").read_text()) for f in (out, tmp_path / "whole"))
    assert a["resumed_at_layer"] == 1 and b["resumed_at_layer"] is None
    strip = lambda m: {k: {x: y for x, y in v.items() if x != "seconds"} for k, v in m["matrices"].items()}  # noqa: E731
    assert strip(a) == strip(b)


def test_stale_work_folder_is_removed_without_resume(tokenizer, text_file, tmp_path, capsys):
    src = save_sharded("llama", tmp_path / "src", tokenizer, layers=3)
    out = tmp_path / "o"
    args = ["prune", src, "--stream", "--calib", text_file, "--nsamples", "4", "--seqlen", "32", "--out", out]
    kill_after_layer_one(args, out)
    (work_dir(out) / "junk").write_text("stale")
    code, _ = run_cli(args, capsys)
    assert code == 0 and not work_dir(out).exists()
    assert json.loads((out / "sparse_export.json").read_text())["resumed_at_layer"] is None
    # a work folder of another recipe is not resumed
    kill_after_layer_one(args[:-2] + ["--out", tmp_path / "p"], tmp_path / "p")
    code, err = run_cli(args[:-2] + ["--out", tmp_path / "p", "--resume", "--sparsity", "0.6"], capsys)
    assert one_line_error(code, err) and "different run" in err


# -- eval


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_eval_equals_in_memory(arch, sharded, tokenizer, text_file):
    windows = data.eval_windows(text_file, tokenizer, 32, max_segments=3)
    model = AutoModelForCausalLM.from_pretrained(sharded[arch]).eval()
    ppl, nll, n = perplexity(model, windows, batch=2, progress=False)
    budget = 0 if arch == "llama" else None          # one of them through the file
    sppl, snll, sn = stream_perplexity(sharded[arch], windows, batch=2, activation_budget=budget, progress=False)
    assert n == sn and sppl == pytest.approx(ppl, rel=1e-4)


def test_cli_eval_streams(sharded, text_file, tmp_path, capsys):
    code = main(["eval", str(sharded["gpt2"]), "--data", str(text_file), "--seqlen", "32", "--max-segments", "3",
                 "--stream", "--json", str(tmp_path / "s.json")])
    code2 = main(["eval", str(sharded["gpt2"]), "--data", str(text_file), "--seqlen", "32", "--max-segments", "3",
                  "--no-stream", "--json", str(tmp_path / "m.json")])
    s, m = (json.loads((tmp_path / f).read_text()) for f in ("s.json", "m.json"))
    assert code == code2 == 0 and s["streamed"] and not m["streamed"]
    assert s["perplexity"] == pytest.approx(m["perplexity"], rel=1e-4)


# -- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prune_matches_cpu(sharded, text_file, tmp_path, tokenizer):
    """Same masks as on the CPU; weights within float tolerance (GPU kernels sum in another order)."""
    r = recipe(text_file)
    prune(sharded["llama"], tmp_path / "cpu", r, stream=True, log=quiet)
    meta = prune(sharded["llama"], tmp_path / "gpu", r, stream=True, device="cuda", log=quiet)
    assert meta["device"].startswith("cuda") and meta["peak_gpu_memory_gib"] > 0
    A, B = state_dict(tmp_path / "cpu"), state_dict(tmp_path / "gpu")
    for k in A:
        assert torch.equal(A[k] == 0, B[k] == 0), k
        torch.testing.assert_close(A[k], B[k], rtol=1e-3, atol=1e-4)
    windows = data.eval_windows(text_file, tokenizer, 32, max_segments=3)
    cpu = stream_perplexity(tmp_path / "cpu", windows, progress=False)[0]
    gpu = stream_perplexity(tmp_path / "cpu", windows, device="cuda", progress=False)[0]
    assert gpu == pytest.approx(cpu, rel=1e-3)
