"""ONNX export: sparsity counted in the file equals the pruned checkpoint; outputs equal torch."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import load_file

from sparse_export import models
from sparse_export.export import graph as onnx_export
from sparse_export.pruning import jobs
from sparse_export.errors import UserError
from sparse_export.export.graph import ExportModule
from sparse_export.export.onnx_plain import export_onnx
from sparse_export.pruning.recipe import Recipe


@pytest.fixture(scope="module")
def pruned(tiny_dirs, text_file, tmp_path_factory):
    """{arch: pruned model folder}: SparseGPT 50% (llama: Linear, opt: Linear/Gemm, gpt2: Conv1D)."""
    root = tmp_path_factory.mktemp("pruned")
    recipe = Recipe(calib=str(text_file), nsamples=4, seqlen=64)
    return {a: jobs.prune(tiny_dirs[a], root / a, recipe, log=lambda *_: None) and root / a
            for a in ("llama", "opt", "gpt2")}


@pytest.fixture(scope="module")
def deployed(pruned, tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    return {a: export_onnx(p, root / a, log=lambda *_: None) and root / a for a, p in pruned.items()}


def _onnx_zero_counts(path):
    """Zero count of every 2-D initializer, counted here straight from the file."""
    proto = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if len(t.dims) == 2}


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_zeros_in_onnx_equal_the_checkpoint_matrix_by_matrix(arch, pruned, deployed):
    ckpt = load_file(str(pruned[arch] / "model.safetensors"))
    meta = json.loads((deployed[arch] / "sparse_export.json").read_text())
    arrays = _onnx_zero_counts(deployed[arch] / "model.onnx")
    mapped = {r["module"]: name for name, r in meta["weights"].items() if r["prunable"]}
    model, _ = models.load_model(pruned[arch])
    assert set(mapped) == set(models.prunable_names(model))  # every pruned matrix, once
    total = zeros = 0
    for module, name in mapped.items():
        ref = ckpt[module + ".weight"].float().numpy()
        arr = arrays[name]
        ref_zeros = ref.size - np.count_nonzero(ref)
        assert arr.size - np.count_nonzero(arr) == ref_zeros, module
        assert meta["weights"][name]["zeros"] == ref_zeros
        # and the very same values (the checkpoint may store Conv1D as in x out: compare as sets of orientation)
        assert np.array_equal(arr, ref) or np.array_equal(arr.T, ref), module
        total, zeros = total + ref.size, zeros + ref_zeros
    assert zeros / total == pytest.approx(0.5, abs=0.01)
    assert meta["prunable_sparsity"] == pytest.approx(zeros / total)


def _run_ort(folder, ids, mask):
    import onnxruntime as ort

    s = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return s.run(None, {"input_ids": ids, "attention_mask": mask})[0]


@pytest.mark.parametrize("logits", ["last", "all", "none"])
def test_onnxruntime_matches_torch_for_each_variant(logits, pruned, tmp_path):
    out = tmp_path / "d"
    meta = export_onnx(pruned["llama"], out, logits=logits, log=lambda *_: None)
    assert meta["logits"] == logits and meta["opset"] == onnx_export.OPSET
    model, _ = models.load_model(pruned["llama"])
    rng = np.random.default_rng(1)
    for batch, seq in [(1, 7), (3, 40)]:  # dynamic axes: shapes unlike the traced one
        ids = rng.integers(0, model.config.vocab_size, (batch, seq)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[0, :3] = 0  # left padding
        got = _run_ort(out, ids, mask)
        with torch.no_grad():
            ref = ExportModule(model, logits)(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        assert got.shape == ref.shape
        if logits == "last":
            assert got.shape == (batch, 1, model.config.vocab_size)
        else:  # padded positions attend to nothing: their values are arbitrary, compare the rest
            got, ref = got[:, 3:], ref[:, 3:]
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_graph_interface(deployed):
    proto = onnx.load(str(deployed["llama"] / "model.onnx"), load_external_data=False)
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.opset_import[0].version == 17
    for i in proto.graph.input:
        assert [d.dim_param for d in i.type.tensor_type.shape.dim] == ["batch", "sequence"]
    folder = deployed["llama"]
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    meta = json.loads((folder / "sparse_export.json").read_text())
    assert meta["kind"] == "deployment" and meta["external_data"] is False
    assert meta["pruning"]["pruned_sparsity"] == pytest.approx(meta["prunable_sparsity"], abs=1e-6)


def test_external_data_past_the_limit(pruned, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "ext"
    meta = export_onnx(pruned["opt"], out, log=lambda *_: None)
    assert meta["external_data"] and (out / "model.onnx.data").is_file()
    assert sorted(p.name for p in out.glob("model.onnx*")) == ["model.onnx", "model.onnx.data"]
    ids = np.arange(10, dtype=np.int64)[None]
    assert _run_ort(out, ids, np.ones_like(ids)).shape == (1, 1, 300)
    assert meta["prunable_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_export_is_atomic_and_refuses_to_overwrite(pruned, tiny_dirs, tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    with pytest.raises(UserError, match="already exists"):
        export_onnx(pruned["llama"], out)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    with pytest.raises(UserError):
        export_onnx(bad, tmp_path / "never")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "d"]  # no half-made folder


@pytest.mark.parametrize("logits", ["last", "all"])
def test_declared_output_shape_matches_what_the_graph_returns(logits, pruned, tmp_path):
    """--logits last declares [batch, 1, vocab] (a fixed 1), all [batch, sequence, vocab]: checked against
    the shape ONNX Runtime returns for inputs unlike the traced ones."""
    out = tmp_path / "d"
    meta = export_onnx(pruned["llama"], out, logits=logits, log=lambda *_: None)
    dims = onnx.load(str(out / "model.onnx")).graph.output[0].type.tensor_type.shape.dim
    declared = [d.dim_param or d.dim_value for d in dims]
    assert declared == meta["declared_output_shape"]
    ids = np.ones((3, 11), np.int64)
    got = _run_ort(out, ids, ids).shape
    for d, g in zip(declared, got):
        assert {"batch": 3, "sequence": 11}.get(d, d) == g
    assert declared[1] == (1 if logits == "last" else "sequence")
