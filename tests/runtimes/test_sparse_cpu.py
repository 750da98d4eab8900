"""The sparse-cpu runtime: packed format, the C++ kernel against a numpy reference of the same integer
arithmetic (both code paths), and the runtime against the fake-quantized torch model."""

import json
import shutil

import numpy as np
import pytest
import torch

from sparse_export.errors import UserError
from sparse_export.runtimes.sparse_cpu import kernel as K
from sparse_export.runtimes.sparse_cpu.model import MASK_MIN_SPARSITY, fake_quant_act, quantize_act
from sparse_export.runtimes.sparse_cpu.packed import WORD, int8_grid, pack, unpack
from tests.tiny import ARCHS, tiny_config

PATHS = ["scalar", pytest.param("avx512", marks=pytest.mark.skipif(not K.has_avx512(),
                                                                      reason="CPU lacks AVX-512 VBMI2/VNNI"))]


def _weights(rng, out, n_in, sparsity):
    q = rng.integers(-128, 128, (out, n_in)).astype(np.int8)
    q[rng.random((out, n_in)) < sparsity] = 0
    return q


def ref_quantize(x):
    """numpy: per-row uint8, scale (hi - lo) / 255 with 0 inside the range, zero point round(-lo / s)."""
    lo = np.minimum(x.min(axis=1), 0).astype(np.float32)
    hi = np.maximum(x.max(axis=1), 0).astype(np.float32)
    s = (hi - lo) / np.float32(255)
    s[s == 0] = 1
    z = np.clip(np.rint(-lo / s), 0, 255)
    q = np.clip(np.rint(x / s[:, None]) + z[:, None], 0, 255)
    return q.astype(np.uint8), s, z.astype(np.int64)


def ref_linear(q, scale, bias, x):
    """numpy: the integers acc - zp * rowsum in int64, then scale_row * scale_token * ints (+ bias) in float32."""
    xq, xs, zp = ref_quantize(x)
    w = q.astype(np.int64)
    ints = xq.astype(np.int64) @ w.T - zp[:, None] * w.sum(axis=1)[None, :]
    y = (scale[None, :] * xs[:, None]) * ints.astype(np.float32)
    return (y + bias if bias is not None else y), ints


@pytest.mark.parametrize("shape", [(1, 1), (3, 63), (5, 64), (7, 65), (17, 200)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
def test_pack_unpack_round_trip(shape, sparsity):
    rng = np.random.default_rng(1)
    q = _weights(rng, *shape, sparsity)
    scale = rng.random(shape[0]).astype(np.float32)
    for dense in (False, True):
        p = pack(q, scale, dense=dense)
        assert np.array_equal(unpack(p), q) and p.dense == dense
        words = -(-shape[1] // WORD)
        nb = p.nbytes()
        if dense:
            assert p.values.shape == (shape[0], WORD * words) and not p.values[:, shape[1]:].any()
            assert nb["values"] == shape[0] * WORD * words and nb["mask"] == 0
        else:
            nnz = int(np.count_nonzero(q))
            assert p.mask.shape == (shape[0], words) and nb["mask"] == 8 * shape[0] * words
            assert nb["values"] == nnz == p.offsets[-1]
            assert np.array_equal(np.diff(p.offsets), np.count_nonzero(q, axis=1))
            # the mask bits are the nonzeros: popcount per row = nonzeros per row
            bits = np.unpackbits(p.mask.view(np.uint8), axis=1, bitorder="little")
            assert np.array_equal(bits.sum(axis=1), np.count_nonzero(q, axis=1))
        assert nb["weight"] == nb["values"] + nb["mask"] + 4 * shape[0]
        assert np.array_equal(p.rowsum, q.astype(np.int64).sum(axis=1))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.7, 0.95])
def test_kernel_equals_numpy_reference_exactly(path, sparsity):
    """Integers and float outputs bit for bit: shapes off the 64 grid, batch 1-8 (and 11: chunks of 8),
    1 and 2 threads, with and without bias, bitmask and dense layouts."""
    rng = np.random.default_rng(int(sparsity * 100))
    for out, n_in in [(37, 100), (130, 577), (64, 64), (9, 1000), (5, 3)]:
        q = _weights(rng, out, n_in, sparsity)
        scale = (rng.random(out) * 0.01).astype(np.float32)
        bias = rng.standard_normal(out).astype(np.float32) if out % 2 else None
        layers = {dense: K.KernelLayer(pack(q, scale, bias, dense=dense)) for dense in (False, True)}
        for n in (1, 2, 3, 4, 5, 6, 7, 8, 11):
            x = (rng.standard_normal((n, n_in)) * rng.choice([0.1, 1, 30])).astype(np.float32)
            if n == 3:
                x[1] = np.abs(x[1])    # all positive: zero point 0
                x[2] = 0               # all zero: scale 1
            y_ref, ints_ref = ref_linear(q, scale, bias, x)
            for dense, layer in layers.items():
                for threads in (1, 2):
                    y, ints = K.linear(layer, x, threads, path, with_ints=True)
                    assert np.array_equal(ints, ints_ref), (out, n_in, n, dense, threads)
                    assert np.array_equal(y, y_ref), (out, n_in, n, dense, threads)


def test_kernel_extreme_values_do_not_overflow():
    """Largest |products| over a long row: 255 * -128 * 4096 stays exact in the int32 accumulators."""
    q = np.full((3, 4096), -128, np.int8)
    q[1] = 127
    x = np.abs(np.random.default_rng(0).standard_normal((2, 4096))).astype(np.float32) + 1
    x[:, 0] = 1000  # large range: most values quantize near the bottom, one at 255
    _, ints_ref = ref_linear(q, np.ones(3, np.float32), None, x)
    for path in ["scalar"] + (["avx512"] if K.has_avx512() else []):
        for dense in (False, True):
            _, ints = K.linear(K.KernelLayer(pack(q, np.ones(3, np.float32), dense=dense)), x, 2, path, True)
            assert np.array_equal(ints, ints_ref)


@pytest.mark.parametrize("path", PATHS)
def test_quantization_matches_numpy_and_torch(path):
    x = np.random.default_rng(2).standard_normal((7, 301)).astype(np.float32) * 3
    x[0] += 5                       # all positive: zero point 0
    x[1] = -np.abs(x[1])            # all negative: zero point 255
    x[2] = 0                        # all zero: scale 1
    x[3, ::7] = -0.0
    rq, rs, rz = ref_quantize(x)
    q, s, z = K.quantize(x, path)
    assert np.array_equal(q, rq) and np.array_equal(s, rs) and np.array_equal(z, rz)
    tq, ts, tz = quantize_act(torch.from_numpy(x))
    assert np.array_equal(tq.numpy(), rq) and np.array_equal(ts.numpy()[:, 0], rs) and np.array_equal(tz.numpy()[:, 0], rz)
    fake = fake_quant_act(torch.from_numpy(x)).numpy()
    assert np.array_equal(fake, ((rq.astype(np.float32) - rz[:, None].astype(np.float32)) * rs[:, None]))


def test_path_choice_and_forced_fallback(monkeypatch):
    monkeypatch.setenv(K.PATH_ENV, "scalar")
    assert K.resolve_path() == "scalar"
    monkeypatch.setenv(K.PATH_ENV, "auto")
    assert K.resolve_path() == ("avx512" if K.has_avx512() else "scalar")
    monkeypatch.setenv(K.PATH_ENV, "sse9")
    with pytest.raises(UserError, match="unknown kernel path 'sse9'"):
        K.resolve_path()


def test_stream_read_checksum():
    """Every byte is read: the checksum is the sum of the 64-bit words plus the bytes after them."""
    buf = np.random.default_rng(3).integers(0, 256, 1_000_003).astype(np.uint8)
    n8 = buf.size // 8 * 8
    with np.errstate(over="ignore"):
        want = int(buf[:n8].view("<u8").sum(dtype=np.uint64)) + int(buf[n8:].sum())
    for path in ["scalar"] + (["avx512"] if K.has_avx512() else []):
        for threads in (1, 2):
            assert K.stream_read(buf, threads, path) == want % 2**64


def test_int8_grid_reads_recorded_scales_exactly_and_rounds_otherwise():
    rng = np.random.default_rng(4)
    q = _weights(rng, 8, 50, 0.5)
    scale = (rng.random(8) * 0.02 + 0.001).astype(np.float32)
    w = torch.from_numpy(q.astype(np.float32) * scale[:, None])
    got, s, exact = int8_grid(w, scale.tolist())
    assert exact and np.array_equal(got, q) and np.array_equal(s, scale)
    got, s, exact = int8_grid(w.bfloat16(), scale.tolist())   # bf16 storage: within half a step, rounds back
    assert exact and np.array_equal(got, q)
    with pytest.raises(UserError, match="not on their recorded"):
        int8_grid(w + 0.3 * torch.from_numpy(scale)[:, None], scale.tolist())
    got, s, exact = int8_grid(w)                             # no grid recorded: nearest, max |row| -> 127
    assert not exact and np.abs(got).max(axis=1).tolist() == [127] * 8
    assert np.abs(got * s[:, None] - w.numpy()).max() <= s.max() / 2 + 1e-7


# ---- the runtime on model folders

def _lively_tiny(arch, folder, tokenizer, seed=0):
    """A tiny random model with larger weights than tests/tiny.py's, so greedy decoding does not
    repeat one token (most architectures) and the comparison means something."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, len(tokenizer))
    config.initializer_range = 0.2
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lively(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("lively")
    return {a: _lively_tiny(a, root / a, tokenizer) for a in ARCHS}


@pytest.fixture(scope="module")
def pruned(lively, text_file, tmp_path_factory):
    """Tiny llamas pruned jointly with --wbits 8 (on the int8 grid): 60% and 0%."""
    from sparse_export.pruning.jobs import prune
    from sparse_export.pruning.recipe import Recipe

    root = tmp_path_factory.mktemp("pruned8")
    out = {}
    for sp in (0.6, 0.0):
        out[sp] = root / f"s{sp}"
        prune(lively["llama"], out[sp], Recipe(sparsity=sp, wbits=8, calib=str(text_file), nsamples=4, seqlen=64),
              log=lambda *_: None)
    return out


def _session(folder, runtime, **kw):
    from sparse_export.runtimes.sparse_cpu.session import DecodeSession

    return DecodeSession(folder, runtime, threads=2, **kw)


def _greedy(session, prompt, n):
    from sparse_export.runtimes.generate import generate_ids

    return generate_ids(session, prompt, n)[0]


def test_runtime_reads_the_pruned_grid_and_matches_the_fake_quantized_model(pruned):
    prompt = list(range(5, 40))
    sparse = _session(pruned[0.6], "sparse-cpu")
    s = sparse.summary
    decoder = [n for n in s["layers"] if n != "lm_head"]
    assert set(s["exact_grid"]) == set(decoder)                  # every pruned matrix read back exactly
    assert all(not s["layers"][n]["dense"] for n in decoder) and s["layers"]["lm_head"]["dense"]
    assert all(s["layers"][n]["sparsity"] >= MASK_MIN_SPARSITY for n in decoder)
    dense = _session(pruned[0.6], "sparse-cpu-dense")
    scalar = _session(pruned[0.6], "sparse-cpu", path="scalar")
    ref, ref32 = _session(pruned[0.6], "fake-quant"), _session(pruned[0.6], "fake-quant-fp32")
    a, b, c, r, r32 = (x.run([prompt], 0)[0] for x in (sparse, dense, scalar, ref, ref32))
    assert np.array_equal(a, b) and np.array_equal(a, c)        # same integers in every layout and path
    assert np.array_equal(a, r)                                 # = torch's exact integer products
    assert np.abs(a - r32).max() <= 1e-3 * np.abs(r32).max()    # ~ the float32 fake-quantized model
    assert s["bytes"]["read"] < dense.weight_bytes["read"]         # the bitmask layout reads less
    # the dense 0% model: "auto" keeps every matrix dense
    d0 = _session(pruned[0.0], "sparse-cpu")
    assert all(layer["dense"] for layer in d0.summary["layers"].values())


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_is_greedy_equal_to_the_fake_quantized_model(arch, lively, tmp_path):
    """Dense folders (rounded per row) and 70% magnitude-pruned ones (bitmask layout): the same logits as
    the fake-quantized torch model (exact products) at every step, so the same greedy tokens."""
    from sparse_export.pruning.jobs import prune
    from sparse_export.pruning.recipe import Recipe

    pruned = tmp_path / "mag"
    prune(lively[arch], pruned, Recipe(method="magnitude", sparsity=0.7), log=lambda *_: None)
    prompt = list(range(5, 25))
    for folder in (lively[arch], pruned):
        # the torch decode loop (native=False): the same float operations as the reference, bit for bit
        runtime, ref = _session(folder, "sparse-cpu", native=False), _session(folder, "fake-quant")
        (a, cache_a), (r, cache_r) = runtime.run([prompt], 0), ref.run([prompt], 0)
        assert np.array_equal(a, r)
        tok = int(np.argmax(a[0, -1]))
        assert np.array_equal(runtime.run([[tok]], len(prompt), cache_a)[0], ref.run([[tok]], len(prompt), cache_r)[0])
        r32 = _session(folder, "fake-quant-fp32").run([prompt], 0)[0]
        assert np.abs(a - r32).max() <= 1e-3 * np.abs(r32).max()
        tokens = _greedy(runtime, prompt, 12)
        assert tokens == _greedy(ref, prompt, 12)
        if arch != "bloom":  # the tiny random bloom repeats one token whatever its weights
            assert len(set(tokens)) > 2


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_native_step_equals_the_torch_loop(arch, lively, tmp_path):
    """The one-token step in C++ (norms, rotary, attention over the cache, SiLU gate, residuals around the
    kernel) against the torch loop on the same packed matrices: the same logits up to float order (an
    activation that rounds to the other side of an int8 step can move them a little more), the same greedy
    tokens, on a dense and a 70% sparse folder, with the cache grown past its first capacity and on
    both kernel paths."""
    from sparse_export.pruning.jobs import prune
    from sparse_export.pruning.recipe import Recipe
    from sparse_export.runtimes.sparse_cpu.decoder import LeanCache

    pruned = tmp_path / "mag"
    prune(lively[arch], pruned, Recipe(method="magnitude", sparsity=0.7), log=lambda *_: None)
    prompt = list(range(7, 37))
    for folder in (lively[arch], pruned):
        for path in [p for p in ("scalar", "avx512") if p == "scalar" or K.has_avx512()]:
            native, plain = _session(folder, "sparse-cpu", path=path), _session(folder, "sparse-cpu", path=path,
                                                                               native=False)
            assert native.decoder.native and not plain.decoder.native
            cache_n, cache_p = LeanCache(*_cache_dims(native), capacity=32), LeanCache(*_cache_dims(plain), capacity=32)
            a, cache_n = native.run([prompt], 0, cache_n)
            b, cache_p = plain.run([prompt], 0, cache_p)
            assert np.array_equal(a, b)                           # a prompt runs the torch loop in both
            n, worst = len(prompt), 0.0
            for _ in range(10):                                   # 30 + 10 tokens: the cache doubles once
                tok = int(np.argmax(b[0, -1]))
                (a, cache_n), (b, cache_p) = native.run([[tok]], n, cache_n), plain.run([[tok]], n, cache_p)
                worst = max(worst, float(np.abs(a - b).max() / np.abs(b).max()))
                assert int(np.argmax(a[0, -1])) == int(np.argmax(b[0, -1]))
                n += 1
            assert cache_n.capacity == 64 and worst < 1e-3
            for i in range(len(cache_n.k)):                       # the C++ step wrote the same keys and values
                assert torch.allclose(cache_n.k[i][:, :, :n], cache_p.k[i][:, :, :n], atol=1e-3, rtol=1e-3)
                assert torch.allclose(cache_n.v[i][:, :, :n], cache_p.v[i][:, :, :n], atol=1e-3, rtol=1e-3)
    assert _greedy(native, prompt, 12) == _greedy(plain, prompt, 12)


def _cache_dims(session):
    d = session.decoder
    return len(d.layers), d.KV, d.D


def test_native_step_declines_what_it_does_not_compute(pruned):
    """Reference modules (torch matmuls), and a layer that is not the plain Llama form, keep the torch loop."""
    assert not _session(pruned[0.6], "fake-quant").decoder.native
    s = _session(pruned[0.6], "sparse-cpu")
    s.model.config.hidden_act = "gelu"
    assert not s.decoder._native_supported()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lean_loop_equals_transformers_forward(arch, lively):
    """decoder.LeanDecoder (fused q/k/v and gate/up, preallocated cache, grown past its first capacity)
    gives transformers' logits, with the kernel and with float32 torch matmuls."""
    from sparse_export.runtimes.sparse_cpu.decoder import LeanCache

    prompt = list(range(5, 30))
    for runtime in ("sparse-cpu", "torch-fp32"):
        lean, plain = _session(lively[arch], runtime), _session(lively[arch], runtime, lean=False)
        assert lean.decoder is not None and plain.decoder is None
        (a, ca), (b, cb) = lean.run([prompt], 0), plain.run([prompt], 0)
        assert isinstance(ca, LeanCache)
        ca.capacity = len(prompt) + 2  # force the cache to grow during the steps below
        ca.k, ca.v = [t[:, :, :ca.capacity] for t in ca.k], [t[:, :, :ca.capacity] for t in ca.v]
        steps = 0
        while steps < 6:
            assert np.allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max()), (runtime, steps)
            tok = int(np.argmax(b[0, -1]))
            (a, ca), (b, cb) = lean.run([[tok]], len(prompt) + steps, ca), plain.run([[tok]], len(prompt) + steps, cb)
            steps += 1
        assert ca.capacity > len(prompt) + 2


def test_prefill_adapter_matches_with_padding(pruned):
    from sparse_export.runtimes import get_runtime

    ids = np.random.default_rng(0).integers(0, 300, (2, 24)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    rt = get_runtime("sparse-cpu")(pruned[0.6], batch=2, seqlen=24, threads=2, logits="all")
    out = rt.run(ids, mask)
    ref = _session(pruned[0.6], "fake-quant", lean=False).model
    with torch.inference_mode():
        want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), use_cache=False).logits
    assert out.shape == (2, 24, 300) and np.array_equal(out, want.numpy())


@pytest.mark.slow
def test_cli_generate_and_benchmark(pruned, tmp_path, capsys):
    from sparse_export.cli.main import main

    assert main(["generate", str(pruned[0.6]), "the model", "--runtime", "sparse-cpu", "--max-new-tokens", "5",
                 "--threads", "1"]) == 0
    assert "sparse-cpu: " in capsys.readouterr().err
    out = tmp_path / "gen.json"
    assert main(["benchmark", str(pruned[0.6]), "--baseline", str(pruned[0.0]), "--mode", "generate",
                 "--runtime", "sparse-cpu", "--runtime", "sparse-cpu-dense", "--prompt-tokens", "16",
                 "--new-tokens", "4", "--warmup", "0", "--iterations", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["runtime"], r["model"]) for r in rows} == {(rt, m) for rt in ("sparse-cpu", "sparse-cpu-dense")
                                                          for m in ("model", "baseline")}
    by = {(r["runtime"], r["model"]): r for r in rows}
    assert by["sparse-cpu", "model"]["weight_bytes"]["read"] < by["sparse-cpu-dense", "model"]["weight_bytes"]["read"]
    assert by["sparse-cpu", "model"]["sparsity"] == pytest.approx(0.6, abs=0.02)
    assert main(["generate", str(tmp_path / "missing"), "x", "--runtime", "sparse-cpu"]) != 0


@pytest.mark.parametrize("arch", ARCHS)
def test_streamed_load_equals_the_whole_model_load(arch, lively, pruned, tmp_path):
    """Reading the matrices from the shards group by group (what an 8B model needs) packs the same bytes
    and gives the same logits as loading the whole checkpoint first: on every architecture, on a bf16
    checkpoint split over several shards, and on a --wbits 8 folder (its recorded grid read back exactly)."""
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(lively[arch], dtype=torch.bfloat16).save_pretrained(
        sharded, max_shard_size="200KB")
    for f in lively[arch].glob("tokenizer*"):
        shutil.copy(f, sharded)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    folders = [lively[arch], sharded] + ([pruned[0.6]] if arch == "llama" else [])
    prompt = list(range(5, 30))
    for folder in folders:
        whole = _session(folder, "sparse-cpu", stream=False)
        streamed = _session(folder, "sparse-cpu", stream=True)
        assert streamed.summary["streamed"] and not whole.summary["streamed"]
        assert streamed.summary["bytes"] == whole.summary["bytes"]
        assert streamed.summary["layers"] == whole.summary["layers"]
        assert streamed.summary["exact_grid"] == whole.summary["exact_grid"]
        (a, cache_a), (b, cache_b) = streamed.run([prompt], 0), whole.run([prompt], 0)
        assert np.array_equal(a, b)
        tok = int(np.argmax(a[0, -1]))
        assert np.array_equal(streamed.run([[tok]], len(prompt), cache_a)[0], whole.run([[tok]], len(prompt), cache_b)[0])


def test_streamed_load_refuses_what_it_cannot_stream(lively, tmp_path):
    with pytest.raises(UserError, match="safetensors folder"):
        _session("smollm2", "sparse-cpu", stream=True)   # a GGUF file
    broken = tmp_path / "broken"
    shutil.copytree(lively["llama"], broken)
    from safetensors.torch import load_file, save_file

    tensors = load_file(broken / "model.safetensors")
    del tensors[next(k for k in tensors if k.endswith("mlp.down_proj.weight"))]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="down_proj"):
        _session(broken, "sparse-cpu", stream=True)
