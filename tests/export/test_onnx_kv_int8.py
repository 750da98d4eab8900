"""INT8 KV-cache graphs (`export onnx --kv-cache --int8`, in memory and streamed) on tiny random models:
the plain INT8 graph's rewrite (Linear matmuls and LM head; attention scores fp32) and calibration, logits
over a prompt and several decode steps within the int8 tolerance of the fake-quantized torch model, greedy
tokens equal to torch's where its choice is clear, DeepSparse's KV adapter (one core: DeepSparse 1.8 crashes
on KV graphs of small grouped-query models with more), and streamed == in memory."""

import importlib.util
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from sparse_export import models
from sparse_export.cli.main import main
from sparse_export.export.int8_calib import fake_int8
from sparse_export.export.kv_layout import KV_INPUTS, cache_names, empty_cache, keep_last, step_feed
from sparse_export.export.onnx_int8 import OUTLIER_RATIO, export_int8, read_qparams
from sparse_export.export.onnx_stream import export_streamed
from sparse_export.export.validate import int8_tolerance, onnxruntime_session
from sparse_export.outputs import read_meta
from sparse_export.pruning.jobs import prune
from sparse_export.pruning.recipe import Recipe
from sparse_export.runtimes import generate as gen
from tests.export.test_onnx_kv import prompt_ids

ARCHS = ["llama", "gpt2"]   # llama: grouped-query, untied head; gpt2: Conv1D, learned positions, tied head
MAX_LEN = 40
QUIET = dict(log=lambda *a: None)
HAS_DEEPSPARSE = importlib.util.find_spec("deepsparse") is not None


@pytest.fixture(scope="module")
def kv_int8(tiny_dirs, text_file, tmp_path_factory):
    """{arch: (pruned --wbits 8 folder, plain int8 deployment, KV int8 (CLI, in memory), KV int8 streamed)}."""
    root = tmp_path_factory.mktemp("kv-int8")
    calib = dict(calib=str(text_file), nsamples=4, seqlen=64)
    out = {}
    for arch in ARCHS:
        folder = root / arch
        prune(tiny_dirs[arch], folder, Recipe(**calib, wbits=8), **QUIET)
        plain = root / f"{arch}-plain-int8"
        export_int8(folder, plain, logits="all", **calib, **QUIET)
        kv = root / f"{arch}-kv-int8"
        assert main(["export", "onnx", str(folder), "--out", str(kv), "--kv-cache", "--int8", "--no-stream",
                     "--max-length", str(MAX_LEN), "--calib", str(text_file), "--nsamples", "4",
                     "--calib-seqlen", "64"]) == 0
        streamed = root / f"{arch}-kv-int8-streamed"
        export_streamed(folder, streamed, kind="kv", max_length=MAX_LEN, progress=False,
                        int8={**calib, "outlier_ratio": OUTLIER_RATIO, "attention": True, "head": True}, **QUIET)
        out[arch] = folder, plain, kv, streamed
    return out


def kv_logits(deploy, ids: np.ndarray, prompt: int) -> np.ndarray:
    """The KV-cache graph on ONNX Runtime: ids[:prompt] as one call, then each later id as a decode step
    with the cache returned so far. Logits of every position [1, len(ids), vocab]."""
    meta = read_meta(deploy)
    c, L = meta["cache"], meta["max_length"]
    session = onnxruntime_session(deploy / "model.onnx")
    names = cache_names(c["layers"], "past_key_values")
    cache, outs = empty_cache(c["layers"], 1, c["kv_heads"], L - prompt, c["head_dim"]), []
    done = 0
    for tokens in [ids[None, :prompt]] + [ids[None, i:i + 1] for i in range(prompt, len(ids))]:
        if done:
            cache = keep_last(cache, L - tokens.shape[1])
        feed = step_feed(tokens, done, L)
        res = session.run(None, {**{k: feed[k] for k in KV_INPUTS}, **dict(zip(names, cache))})
        outs.append(res[0])
        cache, done = res[1:], done + tokens.shape[1]
    return np.concatenate(outs, axis=1)


def torch_logits(folder, deploy, ids: np.ndarray, fake: bool = True) -> np.ndarray:
    """The model with the graph's integer weights (LM head on its per-row grid), its Linear and head inputs
    fake-quantized (fake=True) or not."""
    from sparse_export.export.int8_calib import grid_head

    model, _ = models.load_model(folder)
    meta = read_meta(deploy)["int8"]
    if meta["head"]["dtype"] == "int8":
        grid_head(model, meta["head"]["module"])
    qp, attn = read_qparams(read_meta(deploy))
    assert attn == {}                                 # the KV-cache graph keeps its score matmuls fp32
    with torch.no_grad(), fake_int8(model, qp if fake else {}):
        return model(input_ids=torch.from_numpy(ids[None])).logits.numpy()


def sample_ids(n=20, seed=4):
    return np.random.default_rng(seed).integers(1, 300, n, dtype=np.int64)


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_int8_graph_has_the_plain_int8_rewrite_and_calibration(arch, kv_int8):
    folder, plain, kv, _ = kv_int8[arch]
    meta, ref = read_meta(kv), read_meta(plain)
    assert meta["kind"] == "onnx-kv-cache" and meta["max_length"] == MAX_LEN
    q = meta["int8"]
    # the same calibration pass as the plain int8 graph: the same Linear and head qparams, weights, head choice
    assert q["activations"] == ref["int8"]["activations"]
    assert q["head"] == ref["int8"]["head"] and q["head"]["dtype"] == "int8"
    assert q["weight_source"] == "recorded" and q["fp32_linear"] == []
    assert q["attention"]["score_matmul"] == "fp32" and q["attention"]["qparams"] == {}
    model, _ = models.load_model(folder)
    names = models.prunable_names(model)
    assert q["matmul_integer"] == len(names)
    g = onnx.load(str(kv / "model.onnx")).graph
    ops = Counter(n.op_type for n in g.node)
    assert ops["MatMulInteger"] == len(names) + 1               # + the LM head
    inits = {t.name: t for t in g.initializer}
    assert not [n for n in g.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
    for node in (n for n in g.node if n.op_type == "MatMulInteger"):
        assert numpy_helper.to_array(inits[node.input[1]]).dtype == np.int8
    # the int8 weights are the plain int8 graph's, byte for byte
    plain_inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(plain / "model.onnx")).graph.initializer}
    rows = {r["module"]: n for n, r in meta["weights"].items() if r.get("op") == "MatMulInteger"}
    plain_rows = {r["module"]: n for n, r in ref["weights"].items() if r.get("op") == "MatMulInteger"}
    assert set(rows) == set(names) | {q["head"]["module"]} == set(plain_rows)
    for module, name in rows.items():
        assert np.array_equal(numpy_helper.to_array(inits[name]), plain_inits[plain_rows[module]]), module
    assert meta["prunable_sparsity"] == ref["prunable_sparsity"] >= 0.5
    assert meta["validation"]["max_abs_diff"] <= meta["validation"]["tolerance"]


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_int8_logits_match_fake_quantized_torch_over_decode_steps(arch, kv_int8):
    """A 12-token prompt, then 8 decode steps through the cache: every position within the int8 tolerance
    of the fake-quantized torch model (and far closer to it than to the unquantized one)."""
    folder, _, kv, _ = kv_int8[arch]
    ids = sample_ids()
    got = kv_logits(kv, ids, 12)
    fake, fp32 = torch_logits(folder, kv, ids), torch_logits(folder, kv, ids, fake=False)
    tol = int8_tolerance(fake, fp32)
    err = np.abs(got - fake).max()
    assert err <= tol
    assert err < np.abs(fake - fp32).max() / 20


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_int8_greedy_tokens(arch, kv_int8, tokenizer):
    """Greedy generation from the INT8 KV-cache graph on ONNX Runtime picks torch's (fake-quantized) token at
    every step where torch's choice is stable: its top two logits further apart than twice the graph's
    measured distance from torch on the same sequence (tiny random models have near ties)."""
    folder, _, kv, _ = kv_int8[arch]
    prompt = prompt_ids(tokenizer)
    ours, _ = gen.generate_ids(gen.KVSession(kv, "onnxruntime", threads=1), prompt, 16)
    assert len(ours) == 16
    seq = np.array(prompt + ours, dtype=np.int64)
    fake = torch_logits(folder, kv, seq)
    err = np.abs(kv_logits(kv, seq, len(prompt)) - fake).max()
    stable = 0
    for i, tok in enumerate(ours):
        row = fake[0, len(prompt) - 1 + i]
        top2 = np.sort(row)[-2:]
        if top2[1] - top2[0] > 2 * err:
            assert tok == int(row.argmax()), i
            stable += 1
    assert stable >= 12


@pytest.mark.skipif(not HAS_DEEPSPARSE, reason="DeepSparse not installed")
def test_kv_int8_runs_in_deepsparse(kv_int8, tokenizer):
    """DeepSparse's KV adapter loads the INT8 KV-cache deployment and generates what ONNX Runtime does
    (one core: DeepSparse 1.8 crashes on KV graphs of small grouped-query models with more)."""
    _, _, kv, _ = kv_int8["llama"]
    prompt = prompt_ids(tokenizer)
    ds, _ = gen.generate_ids(gen.KVSession(kv, "deepsparse", threads=1), prompt, 12)
    ort, _ = gen.generate_ids(gen.KVSession(kv, "onnxruntime", threads=1), prompt, 12)
    assert ds == ort


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_kv_int8_equals_in_memory(arch, kv_int8):
    from tests.export.test_stream_export import initializers, same_weights

    _, _, kv, streamed = kv_int8[arch]
    ms, mt = read_meta(streamed), read_meta(kv)
    assert ms["int8"] == mt["int8"]
    assert ms["kind"] == mt["kind"] == "onnx-kv-cache" and ms["cache"] == mt["cache"]
    same_weights(streamed, kv)
    a, b = initializers(streamed), initializers(kv)
    head = ms["int8"]["head"]["module"]
    assert np.array_equal(a[head + ".weight_int8"], b[head + ".weight_int8"])
    ids = sample_ids(16, seed=5)
    assert np.abs(kv_logits(streamed, ids, 10) - kv_logits(kv, ids, 10)).max() <= 1e-5
