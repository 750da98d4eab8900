"""KV-cache ONNX export, `generate`, and their agreement with transformers (tiny random models)."""

import importlib.util

import numpy as np
import onnx
import pytest
import torch

from sparse_export.runtimes import generate as gen
from sparse_export.export import onnx_kv
from sparse_export.cli.main import main
from sparse_export.errors import UserError
from sparse_export.models import load_model

ARCHS = ["llama", "gpt2"]  # llama: grouped-query (4 query heads, 2 KV heads); gpt2: Conv1D, learned positions
MAX_LEN = 48
HAS_DEEPSPARSE = importlib.util.find_spec("deepsparse") is not None


@pytest.fixture(scope="module")
def deployed(tiny_dirs, text_file, tmp_path_factory):
    """{(arch, 'dense'|'sparse'): (model folder, KV-cache deployment folder)}."""
    from sparse_export.pruning.jobs import prune
    from sparse_export.pruning.recipe import Recipe

    root = tmp_path_factory.mktemp("kv")
    out = {}
    for arch in ARCHS:
        sparse = root / f"{arch}-sparse"
        prune(tiny_dirs[arch], sparse, Recipe(calib=str(text_file), nsamples=4, seqlen=64), log=lambda *a: None)
        dense = root / f"{arch}-dense-kv"  # through the CLI
        assert main(["export", "onnx", str(tiny_dirs[arch]), "--out", str(dense), "--kv-cache",
                     "--max-length", str(MAX_LEN)]) == 0
        onnx_kv.export_kv_onnx(sparse, root / f"{arch}-sparse-kv", max_length=MAX_LEN, log=lambda *a: None)
        out[arch, "dense"] = tiny_dirs[arch], dense
        out[arch, "sparse"] = sparse, root / f"{arch}-sparse-kv"
    return out


def prompt_ids(tokenizer, n=12):
    from tests.tiny import TEXT

    return tokenizer(TEXT)["input_ids"][:n]


def hf_greedy(folder, ids, new):
    model, _ = load_model(folder)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=new, do_sample=False)
    return out[0, len(ids):].tolist()


def test_graph_names_and_gqa_cache_shape(deployed):
    proto = onnx.load(str(deployed["llama", "dense"][1] / "model.onnx"), load_external_data=False)
    names = [i.name for i in proto.graph.input]
    assert names[:4] == ["input_ids", "attention_mask", "positions", "causal_mask"]
    assert names[4:] == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert [o.name for o in proto.graph.output] == ["logits"] + [
        f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    dims = [d.dim_value or d.dim_param for d in proto.graph.input[4].type.tensor_type.shape.dim]
    assert dims[1] == 2 and dims[3] == 16  # num_key_value_heads, head_dim (not 4 query heads)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_torch_and_plain_export(deployed, tokenizer, tmp_path, arch):
    import onnxruntime as ort

    from sparse_export.export.onnx_plain import export_onnx

    folder, dep = deployed[arch, "sparse"]
    ids = prompt_ids(tokenizer, 20)
    model, _ = load_model(folder)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    s = gen.KVSession(dep, "onnxruntime", threads=1)
    logits, _ = s.run([ids], 0)
    np.testing.assert_allclose(logits[0], ref, atol=1e-4, rtol=1e-4)
    # the plain export (all positions) gives the same prefill logits
    export_onnx(folder, tmp_path / "plain", logits="all", log=lambda *a: None)
    plain = ort.InferenceSession(str(tmp_path / "plain" / "model.onnx"))
    x = np.array([ids], dtype=np.int64)
    np.testing.assert_allclose(plain.run(None, {"input_ids": x, "attention_mask": np.ones_like(x)})[0][0],
                               logits[0], atol=1e-4, rtol=1e-4)
    # prompt in two chunks, then token by token through the cache: still the same logits
    first, cache = s.run([ids[:7]], 0)
    rest, cache = s.run([ids[7:15]], 7, cache)
    steps = [first[0], rest[0]]
    for i in range(15, 20):
        step, cache = s.run([[ids[i]]], i, cache)
        steps.append(step[0])
    np.testing.assert_allclose(np.concatenate(steps), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers_onnxruntime(deployed, tokenizer, arch, kind):
    folder, dep = deployed[arch, kind]
    ids = prompt_ids(tokenizer)
    ours, stats = gen.generate_ids(gen.KVSession(dep, "onnxruntime", threads=1), ids, 24,
                                   eos=gen.eos_ids(dep, tokenizer))
    assert ours == hf_greedy(folder, ids, 24)
    assert stats["new_tokens"] == len(ours) and stats["ttft_s"] > 0


@pytest.mark.skipif(not HAS_DEEPSPARSE, reason="DeepSparse not installed")
@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_greedy_equals_transformers_deepsparse(deployed, tokenizer, kind):
    folder, dep = deployed["llama", kind]
    ids = prompt_ids(tokenizer)
    ours, _ = gen.generate_ids(gen.KVSession(dep, "deepsparse", threads=1), ids, 16,
                               eos=gen.eos_ids(dep, tokenizer))
    assert ours == hf_greedy(folder, ids, 16)


def test_generation_stops_at_max_length(deployed, tokenizer):
    _, dep = deployed["gpt2", "dense"]
    ids = prompt_ids(tokenizer, MAX_LEN - 3)
    new, stats = gen.generate_ids(gen.KVSession(dep, "onnxruntime"), ids, 50, eos=set())
    assert len(new) == 4 and stats["finish_reason"] == "max_length"  # 3 decode steps fill the cache


def test_sparsity_counted_in_onnx_file(deployed):
    from sparse_export.outputs import read_meta

    for arch in ARCHS:
        meta = read_meta(deployed[arch, "sparse"][1])
        assert meta["prunable_matrices"] == 2 * (7 if arch == "llama" else 4)
        assert meta["prunable_sparsity"] == pytest.approx(0.5, abs=0.01)
        assert read_meta(deployed[arch, "dense"][1])["prunable_sparsity"] < 0.01
    meta = read_meta(deployed["llama", "sparse"][1])
    q = [r for r in meta["weights"].values() if r["module"] == "model.layers.0.self_attn.q_proj"]
    assert len(q) == 1 and q[0]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert meta["cache"]["kv_heads"] == 2 and meta["max_length"] == MAX_LEN


def test_sampling_is_seeded(deployed, tokenizer):
    _, dep = deployed["gpt2", "dense"]
    s = gen.KVSession(dep, "onnxruntime")
    ids = prompt_ids(tokenizer)
    a, _ = gen.generate_ids(s, ids, 12, temperature=1.5, seed=1)
    b, _ = gen.generate_ids(s, ids, 12, temperature=1.5, seed=1)
    c, _ = gen.generate_ids(s, ids, 12, temperature=1.5, seed=2)
    assert a == b and a != c


def test_unsupported_architecture(tiny_dirs, tmp_path):
    with pytest.raises(UserError, match="does not support architecture 'bloom'"):
        onnx_kv.export_kv_onnx(tiny_dirs["bloom"], tmp_path / "out", max_length=32)
    assert not (tmp_path / "out").exists()


def test_cli_prompt_longer_than_max_length(deployed, capsys):
    from tests.tiny import TEXT

    _, dep = deployed["llama", "dense"]
    rc = main(["generate", str(dep), TEXT[:400], "--runtime", "onnxruntime"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "longer than the exported --max-length 48" in err


def test_cli_generate_streams_text(deployed, capsys):
    _, dep = deployed["gpt2", "sparse"]
    rc = main(["generate", str(dep), "the model prunes", "--runtime", "onnxruntime", "--max-new-tokens", "5"])
    out = capsys.readouterr()
    assert rc == 0 and out.out.strip() and "onnxruntime" in out.err


def test_cli_benchmark_generate(deployed, tmp_path, capsys):
    _, dense = deployed["llama", "dense"]
    _, sparse = deployed["llama", "sparse"]
    rc = main(["benchmark", str(sparse), "--baseline", str(dense), "--mode", "generate", "--runtime", "onnxruntime",
               "--prompt-tokens", "16", "--new-tokens", "8", "--warmup", "0", "--iterations", "1",
               "--json", str(tmp_path / "g.json"), "--plot", str(tmp_path / "g.png")])
    assert rc == 0
    import json

    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["model", "baseline"]
    assert rows[1]["speedup_vs_baseline"] == 1 and rows[0]["decode_tok_s"] > 0 and rows[0]["ttft_ms"] > 0
    assert (tmp_path / "g.png").stat().st_size > 0
    assert "decode tok/s" in capsys.readouterr().out
    # a plain (non-KV) folder gets a one-line error
    assert main(["benchmark", str(tmp_path), "--mode", "generate", "--runtime", "onnxruntime"]) == 2


def test_generation_step_of_the_cpu_target(deployed, tmp_path):
    from sparse_export.targets.cpu import generation_step
    from sparse_export.targets.options import CpuOptions

    (dense, _), (sparse, _) = deployed["gpt2", "dense"], deployed["gpt2", "sparse"]
    opts = CpuOptions(prompt_tokens=8, new_tokens=4, iterations=1)
    result = generation_step(dense, sparse, tmp_path, ["onnxruntime"], opts, log=lambda *a: None)
    rows = result["rows"]
    assert [r["model"] for r in rows] == ["dense", "sparse"] and rows[1]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert result["crashes"] == [] and "warnings" in result["trust"] and (tmp_path / "generate.png").is_file()
    assert (tmp_path / "sparse-kv" / "model.onnx").is_file()
