"""The sparse-cpu int4 format: packing, the C++ int4 kernels against a numpy integer reference (both code
paths, bit for bit), and the runtime on 4-bit folders against the fake-quantized torch model."""

import shutil

import numpy as np
import pytest
import torch

from sparse_export.cli.main import main
from sparse_export.errors import UserError
from sparse_export.runtimes.sparse_cpu import kernel as K
from sparse_export.runtimes.sparse_cpu.packed import half_exact, pack4, unpack
from tests.runtimes.test_sparse_cpu import _cache_dims, _greedy, _lively_tiny, _session, ref_quantize
from tests.tiny import ARCHS

PATHS = ["scalar", pytest.param("avx512", marks=pytest.mark.skipif(not K.has_avx512(),
                                                                      reason="CPU lacks AVX-512 VBMI2/VNNI"))]
# (out, in, group size; 0 = one scale per row): widths and row counts off multiples of 64, of the kernel's
# 4-row work items and of 8 tokens
SHAPES = [(5, 96, 32), (7, 320, 64), (13, 100, 0), (9, 256, 128), (6, 160, 32), (3, 200, 0), (11, 384, 128)]


def _int4(rng, out, n_in, sparsity):
    q = rng.integers(-8, 8, (out, n_in)).astype(np.int8)
    q[rng.random((out, n_in)) < sparsity] = 0
    return q


def _scales(rng, out, groups):
    return (rng.random((out, groups)) * 0.1 + 1e-3).astype(np.float16).astype(np.float32)


def ref_linear4(q, gscale, bias, x):
    """numpy, the int4 kernel's arithmetic written independently: columns padded to 64-column words; lane l of
    a word holds columns 4l..4l+3. Per unit (a group of words, or a word when groups are 32 columns: lanes 0-7
    then in its first group, 8-15 in its second) and lane, the integers sum (xq - zp) * q in int64; each lane's
    float32 sum f[l] += scale * float32(ints), unit after unit; the 16 sums added pairwise (8, 4, 2, 1 apart);
    y = token scale * f (+ bias)."""
    xq, xs, zp = ref_quantize(x)
    out, n_in = q.shape
    words = -(-n_in // 64)
    xa = np.zeros((x.shape[0], words, 16, 4), np.int64)
    xa.reshape(x.shape[0], -1)[:, :n_in] = xq.astype(np.int64) - zp[:, None]
    w = np.zeros((out, words, 16, 4), np.int64)
    w.reshape(out, -1)[:, :n_in] = q
    groups = gscale.shape[1]
    size = n_in // groups if groups > 1 else 64 * words
    lanes = np.zeros((x.shape[0], out, 16), np.float32)
    if size == 32:
        for k in range(words):
            ints = np.einsum("tlj,olj->tol", xa[:, k], w[:, k])
            s = np.zeros((out, 16), np.float32)
            for half in (0, 1):
                g = 2 * k + half
                s[:, 8 * half:8 * half + 8] = gscale[:, g:g + 1] if g < groups else 0
            lanes = (lanes + s[None] * ints.astype(np.float32)).astype(np.float32)
    else:
        per = size // 64
        for g in range(groups):
            ints = np.einsum("twlj,owlj->tol", xa[:, g * per:(g + 1) * per], w[:, g * per:(g + 1) * per])
            lanes = (lanes + gscale[None, :, g:g + 1] * ints.astype(np.float32)).astype(np.float32)
    for step in (8, 4, 2, 1):
        lanes[..., :step] = lanes[..., :step] + lanes[..., step:2 * step]
    y = (xs[:, None] * lanes[..., 0]).astype(np.float32)
    return y if bias is None else (y + bias).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 1.0])
def test_pack4_round_trip(shape, sparsity):
    out, n_in, g = shape
    rng = np.random.default_rng(out * n_in)
    q = _int4(rng, out, n_in, sparsity)
    s = _scales(rng, out, n_in // g if g else 1)
    for dense in (False, True):
        p = pack4(q, s, None, dense=dense)
        assert np.array_equal(unpack(p), q) and p.bits == 4
        assert np.array_equal(p.gscale.astype(np.float32), s)
        if not dense:                       # each row: ceil(popcount / 2) bytes per mask word
            counts = np.unpackbits(p.mask.view(np.uint8), axis=1, bitorder="little").reshape(out, -1, 64).sum(2)
            assert int(p.offsets[-1]) == int(((counts + 1) // 2).sum()) and p.nnz == np.count_nonzero(q)
            assert p.values.nbytes == p.offsets[-1] + 32
        else:
            assert p.values.shape == (out, 32 * p.words)


@pytest.mark.parametrize("n_in", [128, 320, 64])
def test_dense_int4_layout_splits_each_128_columns_into_low_and_high_nibbles(n_in):
    """The dense layout the kernel reads: per 128 columns a 64-byte block, byte k = column k (low nibble) and
    64 + k (high); an odd last word a 32-byte block, byte k = its column k (low) and 32 + k (high)."""
    rng = np.random.default_rng(n_in)
    q = rng.integers(-8, 8, (3, n_in)).astype(np.int8)
    v = pack4(q, np.ones((3, 1), np.float32), dense=True).values
    u = q.astype(np.int16) + 8
    for r in range(3):
        for c in range(n_in):
            blk, j = divmod(c, 128)
            span = 64 if 128 * blk + 128 <= 64 * (-(-n_in // 64)) else 32
            byte = v[r, 64 * blk + j % span]
            assert (byte >> 4 if j >= span else byte & 15) == u[r, c], (r, c)


def test_pack4_refuses_what_it_cannot_hold():
    rng = np.random.default_rng(0)
    q = _int4(rng, 4, 128, 0.5)
    with pytest.raises(UserError, match="\\[-8, 7\\]"):
        pack4(q * 2 + 1, np.ones((4, 1), np.float32))
    with pytest.raises(UserError, match="float16"):
        pack4(q, np.full((4, 2), 0.1, np.float32))          # 0.1 is no float16 value
    with pytest.raises(UserError, match="do not divide"):
        pack4(q, np.ones((4, 3), np.float32))
    with pytest.raises(UserError, match="multiple of 32"):
        pack4(q, np.ones((4, 8), np.float32))                # groups of 16
    assert half_exact([0.5, 2 ** -20]) and not half_exact([0.1])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.8, 0.95])
def test_int4_kernel_equals_numpy_reference_exactly(path, sparsity):
    rng = np.random.default_rng(int(sparsity * 100))
    for out, n_in, g in SHAPES:
        q = _int4(rng, out, n_in, sparsity)
        s = _scales(rng, out, n_in // g if g else 1)
        bias = rng.standard_normal(out).astype(np.float32) if out % 2 else None
        layers = [K.KernelLayer(pack4(q, s, bias, dense=d)) for d in (False, True)]
        for batch in (1, 2, 3, 5, 8, 11):
            x = (rng.standard_normal((batch, n_in)) * rng.random(n_in) * 3).astype(np.float32)
            want = ref_linear4(q, s, bias, x)
            for layer in layers:
                for threads in (1, 2):
                    y = K.linear(layer, x, threads, path)
                    assert np.array_equal(y.view(np.int32), want.view(np.int32)), (out, n_in, g, batch, threads)


def test_int4_kernel_extreme_values_do_not_overflow():
    n_in = 65536
    q = np.full((3, n_in), -8, np.int8)
    s = np.ones((3, n_in // 128), np.float32)
    x = np.full((2, n_in), -5.0, np.float32)
    x[:, ::2] = 7.0
    want = ref_linear4(q, s, None, x)
    for path in ["scalar"] + (["avx512"] if K.has_avx512() else []):
        for dense in (False, True):
            y = K.linear(K.KernelLayer(pack4(q, s, dense=dense)), x, 2, path)
            assert np.array_equal(y, want)


def test_kernels_of_both_widths_agree_on_a_per_row_grid():
    """A per-row 4-bit grid runs on the int4 kernel (one group over the padded row) and, as int8 values,
    on the int8 kernel: the same integers (float order differs: compare closely)."""
    from sparse_export.runtimes.sparse_cpu.packed import pack

    rng = np.random.default_rng(5)
    q, s = _int4(rng, 9, 200, 0.6), _scales(rng, 9, 1)
    x = rng.standard_normal((4, 200)).astype(np.float32)
    y4, i4 = K.linear(K.KernelLayer(pack4(q, s)), x, with_ints=True)
    y8, i8 = K.linear(K.KernelLayer(pack(q, s[:, 0])), x, with_ints=True)
    assert np.array_equal(i4, i8) and np.allclose(y4, y8, rtol=1e-6, atol=1e-6)


# ---- the runtime on 4-bit folders

@pytest.fixture(scope="module")
def lively(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("lively4")
    return {a: _lively_tiny(a, root / a, tokenizer) for a in ARCHS}


def _prune4(src, out, text_file, sparsity=0.6, group=32):
    from sparse_export.pruning.jobs import prune
    from sparse_export.pruning.recipe import Recipe

    prune(src, out, Recipe(sparsity=sparsity, wbits=4, group_size=group, calib=str(text_file), nsamples=4,
                           seqlen=64), log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def pruned4(lively, text_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("pruned4")
    return {sp: _prune4(lively["llama"], root / f"s{sp}", text_file, sp) for sp in (0.6, 0.0)}


@pytest.mark.parametrize("arch", ARCHS)
def test_int4_runtime_equals_the_fake_quantized_model(arch, lively, text_file, tmp_path):
    """Every architecture pruned jointly to 60% on a 4-bit g32 grid: the decoder matrices run int4 (bitmask
    and dense), read back exactly; the torch loop's logits equal the fake-quantized model's (exact integer
    products, the kernel's float order) bit for bit, prompt and a cached step; the same greedy tokens."""
    folder = _prune4(lively[arch], tmp_path / "p4", text_file)
    prompt = list(range(5, 25))
    for runtime in ("sparse-cpu", "sparse-cpu-dense"):
        kern, ref = _session(folder, runtime, native=False), _session(folder, "fake-quant")
        layers = kern.summary["layers"]
        decoder = [n for n in layers if n != "lm_head"]
        assert all(layers[n]["bits"] == 4 for n in decoder) and layers["lm_head"]["bits"] == 8
        assert set(kern.summary["exact_grid"]) == set(decoder)
        assert all(layers[n]["dense"] == (runtime == "sparse-cpu-dense") for n in decoder)
        (a, cache_a), (r, cache_r) = kern.run([prompt], 0), ref.run([prompt], 0)
        assert np.array_equal(a, r)
        tok = int(np.argmax(a[0, -1]))
        assert np.array_equal(kern.run([[tok]], len(prompt), cache_a)[0], ref.run([[tok]], len(prompt), cache_r)[0])
        r32 = _session(folder, "fake-quant-fp32").run([prompt], 0)[0]
        assert np.abs(a - r32).max() <= 1e-3 * np.abs(r32).max()
        assert _greedy(kern, prompt, 10) == _greedy(ref, prompt, 10)


def test_int4_layouts_paths_and_bytes(pruned4):
    prompt = list(range(5, 40))
    sparse = _session(pruned4[0.6], "sparse-cpu")
    dense = _session(pruned4[0.6], "sparse-cpu-dense")
    scalar = _session(pruned4[0.6], "sparse-cpu", path="scalar", native=False)
    a, b, c = (x.run([prompt], 0)[0] for x in (sparse, dense, scalar))
    assert np.array_equal(a, b) and np.array_equal(a, c)
    s, d = sparse.summary["bytes"], dense.summary["bytes"]
    assert s["read"] < d["read"]
    weights = sum(v["shape"][0] * v["shape"][1] for n, v in sparse.summary["layers"].items() if n != "lm_head")
    head = sparse.summary["layers"]["lm_head"]["shape"]
    # the dense int4 layout: half a byte per weight (+ float16 group scales), the int8 head a byte
    assert d["values"] == weights // 2 + head[0] * 64 * -(-head[1] // 64)
    auto0 = _session(pruned4[0.0], "sparse-cpu")                      # 0%: "auto" packs dense
    assert all(v["dense"] for v in auto0.summary["layers"].values())


@pytest.mark.parametrize("path", ["scalar", pytest.param("avx512", marks=pytest.mark.skipif(
    not K.has_avx512(), reason="CPU lacks AVX-512 VBMI2/VNNI"))])
def test_native_step_runs_int4(pruned4, path):
    """The C++ decode step on int4 matrices: the torch loop's logits up to float order, the same tokens."""
    from sparse_export.runtimes.sparse_cpu.decoder import LeanCache

    prompt = list(range(7, 37))
    native = _session(pruned4[0.6], "sparse-cpu", path=path)
    plain = _session(pruned4[0.6], "sparse-cpu", path=path, native=False)
    assert native.decoder.native
    cache_n, cache_p = LeanCache(*_cache_dims(native), capacity=64), LeanCache(*_cache_dims(plain), capacity=64)
    a, cache_n = native.run([prompt], 0, cache_n)
    b, cache_p = plain.run([prompt], 0, cache_p)
    n = len(prompt)
    for _ in range(8):
        tok = int(np.argmax(b[0, -1]))
        (a, cache_n), (b, cache_p) = native.run([[tok]], n, cache_n), plain.run([[tok]], n, cache_p)
        assert float(np.abs(a - b).max() / np.abs(b).max()) < 1e-3
        assert int(np.argmax(a[0, -1])) == int(np.argmax(b[0, -1]))
        n += 1


def test_streamed_int4_packing_equals_whole(pruned4, tmp_path):
    """A 4-bit folder read from its shards group by group (as a large model is), whole and split over several
    shards: the same packed bytes, layouts and logits as loading the whole checkpoint first, in both layouts."""
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(pruned4[0.6]).save_pretrained(sharded, max_shard_size="100KB")
    for f in pruned4[0.6].iterdir():
        if f.name.startswith("tokenizer") or f.name == "sparse_export.json":
            shutil.copy(f, sharded)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    prompt = list(range(5, 30))
    for folder in (pruned4[0.6], sharded):
        for runtime in ("sparse-cpu", "sparse-cpu-dense"):
            whole = _session(folder, runtime, stream=False)
            streamed = _session(folder, runtime, stream=True)
            assert streamed.summary["bytes"] == whole.summary["bytes"]
            assert streamed.summary["layers"] == whole.summary["layers"]
            assert all(v["bits"] == 4 for n, v in streamed.summary["layers"].items() if n != "lm_head")
            assert np.array_equal(streamed.run([prompt], 0)[0], whole.run([prompt], 0)[0])


def test_onnx_int8_export_of_a_4bit_folder_is_a_one_line_error(pruned4, tmp_path, capsys):
    out = tmp_path / "onnx"
    code = main(["export", "onnx", str(pruned4[0.6]), "--out", str(out), "--int8"])
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error:") and "4-bit" in err
    assert not out.exists()


def test_int4_folder_with_an_ignored_matrix_runs_unfused(lively, text_file, tmp_path):
    """--ignore leaves q_proj off the 4-bit grid: q/k/v cannot be one packed matrix, so the runtime runs the
    matrices unfused (q_proj int8, the rest int4), still equal to the fake-quantized model."""
    from sparse_export.pruning.jobs import prune
    from sparse_export.pruning.recipe import Recipe

    folder = tmp_path / "ign"
    prune(lively["llama"], folder, Recipe(sparsity=0.5, wbits=4, group_size=32, ignore=["q_proj"],
                                          calib=str(text_file), nsamples=4, seqlen=64), log=lambda *_: None)
    kern, ref = _session(folder, "sparse-cpu"), _session(folder, "fake-quant")
    layers = kern.summary["layers"]
    assert kern.decoder is None and not kern.summary["fused"]
    assert {v["bits"] for n, v in layers.items() if "q_proj" in n} == {8}
    assert {v["bits"] for n, v in layers.items() if "k_proj" in n or "down_proj" in n} == {4}
    prompt = list(range(5, 25))
    assert np.array_equal(kern.run([prompt], 0)[0], ref.run([prompt], 0)[0])


def test_group_grid_above_4_bits_is_refused(lively, text_file, tmp_path):
    from sparse_export.pruning.jobs import prune
    from sparse_export.pruning.recipe import Recipe

    folder = tmp_path / "g8"
    prune(lively["llama"], folder, Recipe(sparsity=0.5, wbits=8, group_size=32, calib=str(text_file), nsamples=4,
                                          seqlen=64), log=lambda *_: None)
    with pytest.raises(UserError, match="4 bits or fewer"):
        _session(folder, "sparse-cpu")
