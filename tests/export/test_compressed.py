"""compressed-tensors export: our writer against the reference (compressed-tensors 0.14.0.1), our reader,
format choice, refusals, and the torch-sparse24 runtime's CPU behaviour."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sparse_export import compressed_format, models
from sparse_export.evaluate import evaluate
from sparse_export.export import compressed
from sparse_export.pruning import jobs
from sparse_export.errors import UserError
from sparse_export.pruning.recipe import Recipe


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def pruned(tiny_dirs, text_file, tmp_path_factory):
    """{kind: pruned folder}: llama 2:4, llama 50% unstructured, gpt2 2:4 (Conv1D stores in x out)."""
    root = tmp_path_factory.mktemp("pruned")
    recipes = {"llama-24": ("llama", dict(pattern="2:4")), "llama-50": ("llama", dict(sparsity=0.5)),
               "gpt2-24": ("gpt2", dict(pattern="2:4"))}
    for kind, (arch, kw) in recipes.items():
        jobs.prune(tiny_dirs[arch], root / kind, Recipe(calib=str(text_file), nsamples=4, seqlen=64, **kw),
                   log=quiet)
    return {kind: root / kind for kind in recipes}


@pytest.fixture(scope="module")
def exported(pruned, tmp_path_factory):
    """{kind: (format, folder)} exported with --format auto."""
    root = tmp_path_factory.mktemp("compressed")
    out = {}
    for kind, folder in pruned.items():
        meta = compressed.export_compressed(folder, root / kind, log=quiet)
        out[kind] = (meta["format"], root / kind)
    return out


def weights(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_bit_identical(expected, got):
    assert sorted(expected) == sorted(got)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].contiguous().view(torch.uint8), v.contiguous().view(torch.uint8)), k


def test_auto_picks_the_format_from_the_masks(exported):
    assert exported["llama-24"][0] == "sparse-24-bitmask"
    assert exported["llama-50"][0] == "sparse-bitmask"
    assert exported["gpt2-24"][0] == "sparse-bitmask"  # 2:4 along the input dim is not 2:4 as stored


def test_dense_model_exports_as_dense(tiny_dirs, tmp_path):
    meta = compressed.export_compressed(tiny_dirs["llama"], tmp_path / "out", log=quiet)
    assert meta["format"] == "dense" and meta["compressed_modules"] == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["sparsity_config"]["format"] == "dense"
    assert_bit_identical(weights(tiny_dirs["llama"]), weights(tmp_path / "out"))


def test_config_keys(exported, pruned):
    qc = json.loads((exported["llama-24"][1] / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["version"] == "0.14.0.1"
    assert qc["config_groups"] == {} and qc["format"] == "dense"
    sc = qc["sparsity_config"]
    assert sorted(sc) == ["format", "global_sparsity", "ignore", "sparsity_structure", "targets"]
    assert (sc["format"], sc["sparsity_structure"], sc["targets"], sc["ignore"]) == \
        ("sparse-24-bitmask", "2:4", ["Linear"], ["lm_head"])
    dense = weights(pruned["llama-24"])
    zeros = sum(int((t == 0).sum()) for t in dense.values())
    assert sc["global_sparsity"] == pytest.approx(zeros / sum(t.numel() for t in dense.values()))
    unstructured = json.loads((exported["llama-50"][1] / "config.json").read_text())
    assert unstructured["quantization_config"]["sparsity_config"]["sparsity_structure"] == "unstructured"


def test_tensor_names_dtypes_and_shapes(exported):
    w24 = weights(exported["llama-24"][1])
    q = "model.layers.0.self_attn.q_proj"
    assert f"{q}.weight" not in w24 and f"{q}.row_offsets" not in w24
    assert (w24[f"{q}.compressed"].dtype, tuple(w24[f"{q}.compressed"].shape)) == (torch.float32, (64, 32))
    assert (w24[f"{q}.bitmask"].dtype, tuple(w24[f"{q}.bitmask"].shape)) == (torch.uint8, (64, 8))
    assert w24[f"{q}.shape"].dtype == torch.int64 and w24[f"{q}.shape"].tolist() == [[64], [64]]
    assert "lm_head.weight" in w24 and "model.embed_tokens.weight" in w24
    wun = weights(exported["llama-50"][1])
    assert wun[f"{q}.compressed"].dim() == 1 and wun[f"{q}.shape"].tolist() == [64, 64]
    assert wun[f"{q}.row_offsets"].dtype == torch.int64 and wun[f"{q}.row_offsets"].shape == (64,)


def test_folder_is_smaller_and_recorded(exported):
    for kind in ("llama-24", "llama-50"):
        meta = json.loads((exported[kind][1] / "sparse_export.json").read_text())
        assert meta["weight_bytes"] < meta["dense_weight_bytes"]
        assert meta["size_ratio"] == pytest.approx(meta["weight_bytes"] / meta["dense_weight_bytes"])
        assert meta["compressed_modules"] == 14 and "compressed-tensors" in meta["versions"]


@pytest.mark.parametrize("kind", ["llama-24", "llama-50", "gpt2-24"])
def test_reference_decompressor_is_bit_identical(kind, exported, pruned):
    ct = pytest.importorskip("compressed_tensors.compressors")
    fmt, folder = exported[kind]
    mc = ct.ModelCompressor.from_pretrained(str(folder))
    assert mc.sparsity_config.format == fmt
    assert type(mc.sparsity_compressor).__name__ == \
        {"sparse-24-bitmask": "Sparse24BitMaskCompressor", "sparse-bitmask": "BitmaskCompressor"}[fmt]
    assert_bit_identical(weights(pruned[kind]), dict(mc.sparsity_compressor.decompress(str(folder))))


def test_reference_compressor_writes_the_same_tensors(exported, pruned):
    """The reference's own compression of the pruned model equals what we wrote, tensor by tensor."""
    ct = pytest.importorskip("compressed_tensors.compressors")
    from transformers import AutoModelForCausalLM

    for kind in ("llama-24", "llama-50"):
        mc = ct.ModelCompressor.from_pretrained(str(exported[kind][1]))
        model = AutoModelForCausalLM.from_pretrained(pruned[kind])
        assert_bit_identical(mc.compress(model), weights(exported[kind][1]))


def test_reference_loads_into_a_model(exported, pruned):
    """llm-compressor's load path: ModelCompressor.decompress(folder, model)."""
    ct = pytest.importorskip("compressed_tensors.compressors")
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = exported["llama-24"][1]
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    ct.ModelCompressor.from_pretrained(str(folder)).decompress(str(folder), model)
    assert_bit_identical(weights(pruned["llama-24"]), {k: v for k, v in model.state_dict().items()})


@pytest.mark.parametrize("kind", ["llama-24", "llama-50", "gpt2-24"])
def test_our_reader_is_bit_identical(kind, exported, pruned):
    folder = exported[kind][1]
    assert compressed_format.is_compressed_folder(folder)
    assert_bit_identical(weights(pruned[kind]), compressed_format.read_state_dict(folder))
    ours, _ = models.load_model(folder)
    ref, _ = models.load_model(pruned[kind])
    sd_ref = ref.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v.view(torch.uint8), sd_ref[k].view(torch.uint8)), k


def test_eval_and_benchmark_runtimes_read_a_compressed_folder(exported, pruned, text_file):
    from sparse_export.runtimes import get_runtime

    ours = evaluate(exported["llama-24"][1], str(text_file), seqlen=32, max_segments=2)
    ref = evaluate(pruned["llama-24"], str(text_file), seqlen=32, max_segments=2)
    assert ours["perplexity"] == ref["perplexity"]
    ids = np.random.default_rng(0).integers(0, 300, (1, 16))
    a, b = (get_runtime("torch")(f, logits="all").run(ids, np.ones_like(ids))
            for f in (exported["llama-24"][1], pruned["llama-24"]))
    assert np.array_equal(a, b)


def test_explicit_bitmask_format_on_a_24_model(pruned, tmp_path):
    meta = compressed.export_compressed(pruned["llama-24"], tmp_path / "o", fmt="sparse-bitmask", log=quiet)
    assert meta["format"] == "sparse-bitmask" and meta["sparsity_structure"] == "2:4"
    assert_bit_identical(weights(pruned["llama-24"]), compressed_format.read_state_dict(tmp_path / "o"))


def test_refuses_24_format_for_a_non_24_model(pruned, tiny_dirs, tmp_path):
    for src in (pruned["llama-50"], tiny_dirs["llama"]):
        with pytest.raises(UserError, match="sparse-24-bitmask needs a 2:4 pruned model"):
            compressed.export_compressed(src, tmp_path / "o", fmt="sparse-24-bitmask", log=quiet)
        assert not (tmp_path / "o").exists()


def test_bad_input(pruned, tmp_path):
    with pytest.raises(UserError, match="model folder not found"):
        compressed.export_compressed(tmp_path / "missing", tmp_path / "o", log=quiet)
    with pytest.raises(UserError, match="unknown format"):
        compressed.export_compressed(pruned["llama-24"], tmp_path / "o", fmt="2:4", log=quiet)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        compressed.export_compressed(pruned["llama-24"], tmp_path / "o", log=quiet)
    assert (tmp_path / "o" / "keep").exists()
    compressed.export_compressed(pruned["llama-24"], tmp_path / "o", force=True, log=quiet)
    assert not (tmp_path / "o" / "keep").exists() and (tmp_path / "o" / "config.json").exists()


def test_cli(pruned, tmp_path, capsys):
    from sparse_export.cli.main import main

    assert main(["export", "compressed", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert main(["export", "compressed", str(pruned["llama-50"]), "--out", str(tmp_path / "o"),
                 "--format", "sparse-24-bitmask"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert main(["export", "compressed", str(pruned["llama-24"]), "--out", str(tmp_path / "o")]) == 0
    assert "smaller" in capsys.readouterr().out
    assert main(["export", "compressed", str(pruned["llama-24"]), "--out", str(tmp_path / "o")]) == 2


def test_bit_packing_matches_numpy_little_endian():
    mask = torch.rand(5, 21, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = compressed_format.pack_bits(mask)
    assert torch.equal(packed, torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little")))
    assert torch.equal(compressed_format.unpack_bits(packed, 21), mask)


def test_24_check():
    w = torch.tensor([[1.0, 0, 0, 2, 0, 0, 0, 3]])
    assert compressed_format.is_24(w) and not compressed_format.is_24(torch.ones(1, 8)) and not compressed_format.is_24(w[:, :6])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_sparse24_runtime_without_cuda(exported):
    from sparse_export.runtimes import available, get_runtime

    assert "torch-sparse24" not in available()
    for name in ("torch-sparse24", "torch-cuda"):
        with pytest.raises(UserError, match=f"the {name} runtime needs a CUDA GPU"):
            get_runtime(name)(exported["llama-24"][1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cutlass", "cusparselt"])
def test_sparse24_runtime_matches_dense_on_gpu(exported, backend):
    from sparse_export.runtimes.torch_sparse24 import TorchCudaDense, TorchSparse24, backend_error

    why = backend_error(backend)
    if why is not None:  # e.g. PyTorch's CUTLASS 2:4 kernels run on compute capability 8.x only
        pytest.skip(f"{backend} does not run on this GPU: {why}")
    folder = exported["llama-24"][1]
    ids = np.random.default_rng(0).integers(0, 300, (2, 64))
    mask = np.ones_like(ids)
    sparse = TorchSparse24(folder, logits="all", backend=backend)
    dense = TorchCudaDense(folder, logits="all")
    assert len(sparse.swapped) == 14 and not sparse.skipped and backend in sparse.version
    a, b = sparse.run(ids, mask), dense.run(ids, mask)
    assert a.shape == (2, 64, 300) and np.abs(a - b).max() <= 2e-2 * np.abs(b).max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sparse24_runtime_refuses_a_backend_this_gpu_lacks(exported):
    """A backend whose kernels fail on this GPU is refused at load, in one line, and auto avoids it."""
    from sparse_export.runtimes.torch_sparse24 import BACKENDS, TorchSparse24, backend_error, pick_backend

    lacking = [b for b in BACKENDS[1:] if backend_error(b) is not None]
    if len(lacking) == len(BACKENDS) - 1:
        with pytest.raises(UserError, match="no 2:4 kernel backend runs on this GPU"):
            pick_backend("auto")
    else:
        assert backend_error(pick_backend("auto")) is None
    if not lacking:
        pytest.skip("every 2:4 backend runs on this GPU")
    for backend in lacking:
        with pytest.raises(UserError, match=f"the {backend} 2:4 kernels do not run here"):
            TorchSparse24(exported["llama-24"][1], backend=backend)
