"""Keeping the Linear layers most sensitive to int8 inputs in fp32 (prepare_int8's max_error): the
errors against a plain numpy computation, the threshold applied exactly, and bad values refused."""

import numpy as np
import pytest
import torch

from sparse_export import models
from sparse_export.errors import UserError
from sparse_export.export.int8_calib import input_quant_errors
from sparse_export.export.onnx_int8 import export_int8, prepare_int8
from tests.tiny import tiny_model


def windows(n=4, seqlen=32, seed=0):
    return torch.randint(1, 300, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def numpy_errors(model, ids, qparams):
    """Each module's input captured whole, quantized by hand, both products in float64."""
    got = {n: [] for n in qparams}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: got[n].append(a[0].detach().reshape(-1, a[0].shape[-1]).numpy().astype(np.float64)))
        for n in qparams]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    out = {}
    for n, (scale, zp) in qparams.items():
        x = np.concatenate(got[n])
        xq = (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale
        w = models.weight_2d(model.get_submodule(n)).numpy().astype(np.float64)
        out[n] = float(((xq @ w.T - x @ w.T) ** 2).sum() / ((x @ w.T) ** 2).sum())
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_errors_match_numpy(arch):
    model = tiny_model(arch)
    ids = windows()
    _, qp, _, _, _ = prepare_int8(model, {}, ids, outlier_ratio=None)
    got = input_quant_errors(model, ids, qp, batch=2)
    ref = numpy_errors(model, ids, qp)
    assert got.keys() == ref.keys()
    for n in ref:
        assert got[n] == pytest.approx(ref[n], rel=1e-3), n
    assert len({round(v, 12) for v in got.values()}) > 1      # not one number for all


def test_threshold_keeps_exactly_the_sensitive_modules():
    ids = windows()
    model = tiny_model("llama")
    _, qp, _, _, none = prepare_int8(model, {}, ids, outlier_ratio=None)
    errors = input_quant_errors(model, ids, qp)
    assert none == []
    cut = float(np.median(list(errors.values())))
    model = tiny_model("llama")
    _, qp2, _, _, fp32 = prepare_int8(model, {}, ids, outlier_ratio=None, max_error=cut)
    assert sorted(fp32) == sorted(n for n, e in errors.items() if e > cut)
    assert 0 < len(fp32) < len(errors) and set(qp2) == set(errors) - set(fp32)


def test_bad_max_error_is_refused(tiny_dirs, text_file, tmp_path):
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(UserError, match="--max-error"):
            export_int8(tiny_dirs["llama"], tmp_path / "o", calib=str(text_file), nsamples=2, seqlen=32,
                        max_error=bad, log=lambda *a: None)
    assert not (tmp_path / "o").exists()
