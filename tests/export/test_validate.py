"""Exports check their own output: ONNX Runtime against torch, recorded under "validation", refused
(one line, nothing written) past the tolerance."""

import copy

import numpy as np
import pytest
import torch

from sparse_export import models
from sparse_export.errors import UserError
from sparse_export.export import onnx_plain, validate
from sparse_export.export.onnx_kv import export_kv_onnx
from sparse_export.export.onnx_plain import export_onnx
from sparse_export.outputs import read_meta


def quiet(*_):
    pass


@pytest.mark.parametrize("logits", ["last", "all", "none"])
def test_export_onnx_records_its_validation(tiny_dirs, tmp_path, logits):
    meta = export_onnx(tiny_dirs["llama"], tmp_path / "d", logits=logits, log=quiet)
    v = read_meta(tmp_path / "d")["validation"]
    assert v == meta["validation"] and v["runtime"] == "onnxruntime"
    assert 0 <= v["max_abs_diff"] <= v["tolerance"] == validate.LOGITS_TOLERANCE and v["max_abs_output"] > 0


def test_export_onnx_refuses_a_graph_that_disagrees(tiny_dirs, tmp_path, monkeypatch):
    """The torch model changes after tracing (as a wrong graph would): the export refuses, leaves nothing."""
    real = onnx_plain.write_onnx

    def write_then_change(model, path, *a, **k):
        out = real(model, path, *a, **k)
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(1.5)
        return out

    monkeypatch.setattr(onnx_plain, "write_onnx", write_then_change)
    with pytest.raises(UserError, match="disagrees with torch"):
        export_onnx(tiny_dirs["llama"], tmp_path / "d", log=quiet)
    assert not (tmp_path / "d").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kv_export_records_prompt_and_decode_validation(tiny_dirs, tmp_path, arch):
    export_kv_onnx(tiny_dirs[arch], tmp_path / "kv", max_length=32, log=quiet)
    v = read_meta(tmp_path / "kv")["validation"]
    assert "decode step" in v["inputs"] and v["max_abs_diff"] <= v["tolerance"]


def test_kv_validation_sees_a_dropped_cache(tiny_dirs, tmp_path, monkeypatch):
    """The decode step is checked with the cache the prompt returned: a runtime that drops it fails."""
    export_kv_onnx(tiny_dirs["llama"], tmp_path / "kv", max_length=32, log=quiet)
    model, _ = models.load_model(tiny_dirs["llama"])
    validate.validate_kv(model.float(), tmp_path / "kv" / "model.onnx", 32)  # as written: passes
    monkeypatch.setattr(validate, "keep_last", lambda present, slots: [np.zeros_like(p[:, :, -slots:])
                                                                       for p in present])
    with pytest.raises(UserError, match="KV-cache graph"):
        validate.validate_kv(model.float(), tmp_path / "kv" / "model.onnx", 32)


def test_compare_and_agreement():
    ref = np.zeros((1, 1, 3), np.float32)
    assert validate.compare(ref + 1e-4, ref, 1e-3, "x")["max_abs_diff"] == pytest.approx(1e-4)
    with pytest.raises(UserError, match="x disagrees"):
        validate.compare(ref + 1.0, ref, 1e-3, "x")
    with pytest.raises(UserError, match="nan|disagrees"):
        validate.compare(ref + np.nan, ref, 1e-3, "x")
    rows = [{"model": "m", "runtime": "r", "output": ref}]
    assert validate.agreement(rows, {"m": ref})[0]["max_abs_diff"] == 0
    assert validate.int8_tolerance(ref + 2, ref) == 2 * validate.INT8_NOISE_FACTOR
    assert validate.int8_tolerance(ref, ref) == validate.LOGITS_TOLERANCE


def test_fp32_rounding_widens_the_tolerance_only_as_far_as_it_goes(tiny_dirs):
    """A model with large weights rounds more in fp32: compare_fp32 measures that (fp64 copy) and accepts
    an engine within FP32_NOISE_FACTOR of it, and still refuses an output off by more."""
    model, _ = models.load_model(tiny_dirs["llama"])
    model.float()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3e4)       # logits ~1e4: fp32 rounding ~1e-3
    ids, mask = validate.random_tokens(model.config.vocab_size, 1, 16)
    ref = validate.reference_output(model, "all", ids, mask)
    exact = validate._output64(copy.deepcopy(model).double(), "all", ids, mask)
    noise = float(np.abs(ref.astype(np.float64) - exact).max())
    assert noise > validate.LOGITS_TOLERANCE / validate.FP32_NOISE_FACTOR      # the case this is for
    output_of = lambda m: validate._output64(m, "all", ids, mask)
    off = np.float32(2 * noise)
    got = validate.compare_fp32(ref + off, ref, model, output_of, validate.LOGITS_TOLERANCE, "x")
    assert got["fp32_noise"] == pytest.approx(noise) and got["max_abs_diff"] == pytest.approx(off, rel=1e-3)
    with pytest.raises(UserError, match="x disagrees"):
        validate.compare_fp32(ref + 5 * noise, ref, model, output_of, validate.LOGITS_TOLERANCE, "x")
    # within the plain tolerance, nothing extra is measured
    assert "fp32_noise" not in validate.compare_fp32(ref, ref, model, output_of, validate.LOGITS_TOLERANCE, "x")


def test_fp32_tolerance_is_the_fixed_one_unless_rounding_is_larger(tiny_dirs):
    model, _ = models.load_model(tiny_dirs["llama"])
    model.float()
    ids, mask = validate.random_tokens(model.config.vocab_size, 1, 16)
    ref = validate.reference_output(model, "last", ids, mask)
    assert validate.fp32_tolerance(model, "last", ids, mask, ref) == validate.LOGITS_TOLERANCE
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(3e4)
    ref = validate.reference_output(model, "last", ids, mask)
    exact = validate._output64(copy.deepcopy(model).double(), "last", ids, mask)
    noise = float(np.abs(ref.astype(np.float64) - exact).max())
    assert validate.fp32_tolerance(model, "last", ids, mask, ref) == pytest.approx(
        max(validate.LOGITS_TOLERANCE, validate.FP32_NOISE_FACTOR * noise))
    assert noise * validate.FP32_NOISE_FACTOR > validate.LOGITS_TOLERANCE
