"""Streamed ONNX export (one decoder layer traced, repeated, weights written layer by layer) against the
traced in-memory export: same outputs, same initializer bytes, same sparsity figures, on every
architecture; the KV-cache graph generates what transformers generates; memory stays bounded."""

import hashlib
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from sparse_export.cli.main import main
from sparse_export.errors import UserError
from sparse_export.export import onnx_stream
from sparse_export.export.onnx_int8 import OUTLIER_RATIO, export_int8
from sparse_export.export.onnx_kv import export_kv_onnx
from sparse_export.export.onnx_plain import export_onnx
from sparse_export.export.onnx_stream import choose_stream, export_streamed
from sparse_export.export.validate import int8_tolerance
from sparse_export.outputs import read_meta
from sparse_export.pruning.jobs import prune
from sparse_export.pruning.recipe import Recipe
from sparse_export.runtimes import generate as gen
from tests.export.test_onnx_kv import hf_greedy, prompt_ids
from tests.tiny import ARCHS

QUIET = dict(log=lambda *a: None)
SUMMARY = ("prunable_sparsity", "prunable_matrices", "all_weights_sparsity", "weight_initializers")
# each architecture once, every logits variant on several
VARIANTS = {"llama": "last", "mistral": "all", "qwen2": "none", "opt": "all", "gpt2": "last", "gpt_neox": "none",
            "bloom": "all"}
KV_ARCHS = ["llama", "qwen2", "opt", "gpt2", "gpt_neox"]
MAX_LEN = 40


@pytest.fixture(scope="module")
def pruned(tiny_dirs, tmp_path_factory):
    """{arch: magnitude-pruned (50%) model folder}."""
    root = tmp_path_factory.mktemp("stream-pruned")
    out = {}
    for arch in ARCHS:
        prune(tiny_dirs[arch], root / arch, Recipe(method="magnitude"), **QUIET)
        out[arch] = root / arch
    return out


def ort_run(folder, feed):
    from sparse_export.export.validate import onnxruntime_session

    return onnxruntime_session(Path(folder) / "model.onnx").run(None, feed)


def initializers(folder) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(Path(folder) / "model.onnx")).graph.initializer}


def digest(a: np.ndarray) -> str:
    return hashlib.sha1(a.dtype.str.encode() + str(a.shape).encode() + np.ascontiguousarray(a).tobytes()).hexdigest()


def same_weights(streamed, traced) -> None:
    """Each prunable matrix holds the same bytes in both files, and so does every initializer (up to names
    and the constants the one-layer template shares between layers)."""
    ms, mt = read_meta(streamed), read_meta(traced)
    a, b = initializers(streamed), initializers(traced)
    by_module = {r["module"]: n for n, r in mt["weights"].items() if r.get("prunable")}
    rows = {r["module"]: (n, r) for n, r in ms["weights"].items() if r.get("prunable")}
    assert set(rows) == set(by_module)
    for module, (name, row) in rows.items():
        assert digest(a[name]) == digest(b[by_module[module]]), module
        assert row["zeros"] == mt["weights"][by_module[module]]["zeros"]
    assert {digest(x) for x in a.values()} == {digest(x) for x in b.values()}
    assert {k: ms[k] for k in SUMMARY} == {k: mt[k] for k in SUMMARY}


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_graph_equals_the_traced_export(arch, pruned, tmp_path):
    logits = VARIANTS[arch]
    folder = pruned[arch]
    traced = tmp_path / "traced"
    export_onnx(folder, traced, logits=logits, **QUIET)
    streamed = tmp_path / "streamed"
    meta = export_streamed(folder, streamed, logits=logits, progress=False, **QUIET)
    assert meta["streamed"]["layers"] == 2 and meta["validation"]["layers_checked"] == 2
    assert (streamed / "model.onnx.data").is_file() and (streamed / "model.onnx").stat().st_size < 200_000
    ids = np.random.default_rng(1).integers(0, 300, (2, 11), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[0, :3] = 0                                   # left padding
    feed = {"input_ids": ids, "attention_mask": mask}
    got, ref = ort_run(streamed, feed)[0], ort_run(traced, feed)[0]
    assert got.shape == ref.shape
    if logits != "last":                              # padded positions attend to nothing: compare the rest
        got, ref = got[:, 3:], ref[:, 3:]
    assert np.abs(got - ref).max() <= 1e-5
    same_weights(streamed, traced)
    assert read_meta(traced)["prunable_sparsity"] == pytest.approx(0.5, abs=0.01)
    g = onnx.load(str(streamed / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in g.input] == ["input_ids", "attention_mask"]
    declared = [d.dim_param or d.dim_value for d in g.output[0].type.tensor_type.shape.dim]
    assert declared == meta["declared_output_shape"]


@pytest.mark.parametrize("arch", KV_ARCHS)
def test_kv_graph_generates_what_transformers_generates(arch, pruned, tokenizer, tmp_path):
    folder = pruned[arch]
    dep = tmp_path / "kv"
    meta = export_streamed(folder, dep, kind="kv", max_length=MAX_LEN, progress=False, **QUIET)
    ids = prompt_ids(tokenizer)
    ours, _ = gen.generate_ids(gen.KVSession(dep, "onnxruntime", threads=1), ids, 20, eos=gen.eos_ids(dep, tokenizer))
    assert ours == hf_greedy(folder, ids, 20)
    assert meta["cache"]["layers"] == 2 and meta["kind"] == "onnx-kv-cache"
    g = onnx.load(str(dep / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in g.input][4:] == [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert [o.name for o in g.output] == ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    if arch in ("llama", "gpt2"):                     # against the traced KV export: logits, bytes, figures
        traced = tmp_path / "traced-kv"
        export_kv_onnx(folder, traced, max_length=MAX_LEN, **QUIET)
        a = gen.KVSession(dep, "onnxruntime", threads=1).run([ids], 0)[0]
        b = gen.KVSession(traced, "onnxruntime", threads=1).run([ids], 0)[0]
        assert np.abs(a - b).max() <= 1e-5
        same_weights(dep, traced)


@pytest.fixture(scope="module")
def int8_pairs(tiny_dirs, text_file, tmp_path_factory):
    """{case: (model folder, traced int8 deployment, streamed int8 deployment)}."""
    root = tmp_path_factory.mktemp("stream-int8")
    calib = dict(calib=str(text_file), nsamples=4, seqlen=64)
    out = {}
    cases = [("llama", "llama", dict(wbits=8), True), ("opt-per-tensor", "opt", dict(wbits=8, per_channel=False), True),
             ("gpt2-rounded", "gpt2", {}, True), ("opt-fp32-head", "opt", dict(wbits=8), False)]
    for case, arch, recipe, head in cases:
        folder = root / case
        prune(tiny_dirs[arch], folder, Recipe(**calib, **recipe), **QUIET)
        export_int8(folder, root / f"{case}-traced", logits="all", head=head, **calib, **QUIET)
        export_streamed(folder, root / f"{case}-streamed", kind="int8", logits="all", progress=False,
                        int8={**calib, "outlier_ratio": OUTLIER_RATIO, "attention": True, "head": head}, **QUIET)
        out[case] = folder, root / f"{case}-traced", root / f"{case}-streamed"
    return out


@pytest.mark.parametrize("case", ["llama", "opt-per-tensor", "gpt2-rounded", "opt-fp32-head"])
def test_int8_graph_equals_the_traced_int8_export(case, int8_pairs):
    from sparse_export import models
    from sparse_export.export.onnx_int8 import read_qparams
    from sparse_export.export.int8_calib import fake_int8, grid_head

    folder, traced, streamed = int8_pairs[case]
    ms, mt = read_meta(streamed), read_meta(traced)
    assert ms["int8"] == mt["int8"]                   # same activation ranges, scales, weight source, fp32 list
    assert ms["int8"]["matmul_integer"] > 0
    head = ms["int8"]["head"]                         # the LM head: int8 unless --fp32-head, same bytes
    assert head["dtype"] == ("fp32" if case == "opt-fp32-head" else "int8")
    assert head["tied_embeddings"] == case.startswith(("opt", "gpt2"))
    a, b = initializers(streamed), initializers(traced)
    if head["dtype"] == "int8":
        for suffix in (".weight_int8", ".rescale", ".input_quant.scale", ".input_quant.zero_point"):
            name = head["module"] + suffix
            assert digest(a[name]) == digest(b[name]), name
        assert a[head["module"] + ".weight_int8"].dtype == np.int8
        assert ms["weights"][head["module"] + ".weight_int8"] == mt["weights"][head["module"] + ".weight_int8"]
    else:
        assert not any(n.startswith(head["module"] + ".") for n in a)
    same_weights(streamed, traced)
    rows = [r for r in ms["weights"].values() if r.get("prunable")]
    assert rows and all(r["op"] == "MatMulInteger" for r in rows)
    ids = np.random.default_rng(2).integers(0, 300, (2, 20), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    got, ref = ort_run(streamed, feed)[0], ort_run(traced, feed)[0]
    # the existing int8 tolerance: 2 x how far quantizing the activations moves torch's logits
    model, _ = models.load_model(folder)
    if ms["int8"]["weight_source"] == "round-to-nearest":
        from sparse_export.pruning.grid import round_weights

        round_weights(model)
    if head["dtype"] == "int8":
        grid_head(model, head["module"])
    with torch.no_grad():
        fp32 = model(input_ids=torch.from_numpy(ids)).logits.numpy()
        with fake_int8(model, *read_qparams(ms)):
            fake = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(got - ref).max() <= int8_tolerance(fake, fp32)
    assert np.abs(got - fake).max() <= int8_tolerance(fake, fp32)


@pytest.mark.skipif(importlib.util.find_spec("deepsparse") is None, reason="DeepSparse not installed")
def test_deepsparse_runs_streamed_graphs(int8_pairs, pruned, tokenizer, tmp_path):
    """DeepSparse reads the external-data graphs: the int8 one agrees with ONNX Runtime, the KV-cache one
    generates what transformers generates."""
    from sparse_export.runtimes import get_runtime

    _, _, streamed = int8_pairs["llama"]
    ids = np.random.default_rng(3).integers(0, 300, (1, 32), dtype=np.int64)
    mask = np.ones_like(ids)
    got = get_runtime("deepsparse")(streamed, batch=1, seqlen=32, threads=1).run(ids, mask)
    ref = ort_run(streamed, {"input_ids": ids, "attention_mask": mask})[0]
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()
    dep = tmp_path / "kv"
    export_streamed(pruned["llama"], dep, kind="kv", max_length=MAX_LEN, progress=False, **QUIET)
    prompt = prompt_ids(tokenizer)
    ours, _ = gen.generate_ids(gen.KVSession(dep, "deepsparse", threads=1), prompt, 16, eos=gen.eos_ids(dep, tokenizer))
    assert ours == hf_greedy(pruned["llama"], prompt, 16)


def test_cli_streams_by_budget_and_flag(pruned, tmp_path, capsys):
    folder = pruned["llama"]
    assert not choose_stream(folder)                  # tiny: in memory by default
    assert choose_stream(folder, budget=1000)         # past the budget: streamed
    assert not choose_stream(folder, stream=False, budget=1000)
    assert main(["export", "onnx", str(folder), "--out", str(tmp_path / "a"), "--memory-budget", "0.000001"]) == 0
    assert read_meta(tmp_path / "a")["streamed"]["layers"] == 2
    assert main(["export", "onnx", str(folder), "--out", str(tmp_path / "b"), "--stream", "--kv-cache",
                 "--max-length", "32"]) == 0
    assert read_meta(tmp_path / "b")["kind"] == "onnx-kv-cache" and "streamed" in read_meta(tmp_path / "b")
    capsys.readouterr()
    assert main(["export", "onnx", "smollm2", "--out", str(tmp_path / "c"), "--stream"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--stream needs a local safetensors model folder" in err and "\n" not in err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("param, error", [("self_attn.q_proj", "disagrees with torch"),
                                          ("mlp.up_proj", "fails on ONNX Runtime")])
def test_a_wrong_weight_is_caught(param, error, pruned, tmp_path, monkeypatch):
    """The check can fail: a layer initializer left unidentified keeps its random trace values (and, for
    the MLP, the trace's narrow shape)."""
    from sparse_export.export import stream_trace

    real = stream_trace.identify

    def lose_one(proto, model):
        found = real(proto, model)
        found.pop(next(n for n, s in found.items() if s.param.endswith(f"layers.0.{param}.weight")))
        return found

    monkeypatch.setattr(stream_trace, "identify", lose_one)
    with pytest.raises(UserError, match=error):
        export_streamed(pruned["llama"], tmp_path / "x", logits="all", progress=False, **QUIET)
    assert not (tmp_path / "x").exists()


def test_zeros_counted_in_chunks(tmp_path):
    """graph.count_nonzero reads external data a chunk at a time: the same count as numpy on the array."""
    from sparse_export.export.graph import count_nonzero

    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 70)).astype(np.float32)
    w[rng.random(w.shape) < 0.6] = 0
    d = onnx_stream.DataFile(tmp_path / "w.data")
    t = d.put_tensor("w", torch.from_numpy(w), True, [70, 300])
    d.close()
    assert count_nonzero(t, tmp_path, chunk=4 * 97) == np.count_nonzero(w)
    assert np.array_equal(numpy_helper.to_array(t, str(tmp_path)), w.T)


RSS_SCRIPT = textwrap.dedent("""
    import json, shutil, sys
    from sparse_export.cli.main import main
    from sparse_export.outputs import peak_rss_gib, reset_peak_rss

    small, big, out = sys.argv[1:4]

    def growth(folder, name):
        before = peak_rss_gib("VmRSS")
        assert reset_peak_rss()
        assert main(["export", "onnx", folder, "--out", out + name, "--memory-budget", "0.1"]) == 0
        return (peak_rss_gib() - before) * 2**30

    growth(small, "-warm")      # imports, lazily loaded code, the engine's first session: not the model's memory
    print(json.dumps({"small": growth(small, "-small"), "big": growth(big, "-big")}))
""")


def random_llama(folder, tokenizer, layers: int, hidden: int, inner: int) -> int:
    """A Llama-shaped folder of random bf16 weights, one shard per layer (written without building the
    model). Returns the bytes of its weights in float32."""
    from transformers import LlamaConfig

    from sparse_export.checkpoints import shard_name, write_index, write_shard

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inner,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False, dtype="bfloat16")
    g = torch.Generator().manual_seed(0)
    pool = (torch.randn(2 * hidden * max(inner, len(tokenizer)), generator=g) * 0.05).to(torch.bfloat16)
    kv = hidden // 4

    def rand(*shape):                   # cheap: windows of one draw
        n = int(np.prod(shape))
        start = int(torch.randint(0, pool.numel() - n, (), generator=g))
        return pool[start:start + n].reshape(shape).clone()

    folder.mkdir()
    n = layers + 2
    weight_map, total = {}, 0
    shards = [{"model.embed_tokens.weight": rand(len(tokenizer), hidden)}]
    shapes = {"input_layernorm": (hidden,), "post_attention_layernorm": (hidden,), "self_attn.q_proj": (hidden, hidden),
              "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inner, hidden), "mlp.up_proj": (inner, hidden), "mlp.down_proj": (hidden, inner)}
    for i in range(layers):
        shards.append({f"model.layers.{i}.{m}.weight": rand(*shape) for m, shape in shapes.items()})
    shards.append({"model.norm.weight": rand(hidden), "lm_head.weight": rand(len(tokenizer), hidden)})
    for k, tensors in enumerate(shards, 1):
        write_shard(folder / shard_name(k, n), tensors)
        weight_map.update({name: shard_name(k, n) for name in tensors})
        total += sum(t.numel() for t in tensors.values())
    write_index(folder, weight_map, 2 * total)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return 4 * total


def test_peak_memory_stays_near_one_layer(tokenizer, tmp_path):
    """A 24-layer model with 349 MiB of float32 weights, over a 0.1 GiB budget, is streamed by default, and
    the export's peak RSS (a fresh process, measured after a warm-up export) grows by far less than the
    model, and by about as much as for the same model with 2 layers: the peak does not depend on depth."""
    small, big = tmp_path / "small", tmp_path / "big"
    random_llama(small, tokenizer, layers=2, hidden=512, inner=2048)
    fp32_bytes = random_llama(big, tokenizer, layers=24, hidden=512, inner=2048)
    layer_bytes = 4 * (2 * 512 * 512 + 2 * 512 * 128 + 3 * 512 * 2048 + 2 * 512)
    assert fp32_bytes > 340 * 2**20
    out = tmp_path / "deploy"
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(small), str(big), str(out)], capture_output=True,
                          text=True, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    meta = read_meta(str(out) + "-big")
    assert meta["validation"]["layers_checked"] == 2 and meta["streamed"]["layers"] == 24
    assert meta["streamed"]["data_bytes"] == fp32_bytes
    assert r["big"] < 0.15 * fp32_bytes, f"peak grew by {r['big'] / 2**20:.0f} MiB for {fp32_bytes / 2**20:.0f} MiB"
    assert r["big"] < r["small"] + 3 * layer_bytes, r
