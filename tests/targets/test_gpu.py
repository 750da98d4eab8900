"""`prune-and-export --target gpu`: prune 2:4 -> compressed-tensors -> verify -> report, on a tiny model."""

import json

import pytest
import torch

from sparse_export import compressed_format
from sparse_export.errors import UserError
from sparse_export.export import compressed
from sparse_export.targets.gpu import run_gpu_target
from sparse_export.targets.options import build_options


def quiet(*_):
    pass


def gpu(**given):
    return build_options("gpu", **given)


@pytest.mark.slow
def test_gpu_target_writes_a_verified_report(tiny_dirs, text_file, tmp_path):
    out = tmp_path / "gpu"
    r = run_gpu_target(tiny_dirs["llama"], out, gpu(calib=str(text_file), nsamples=4, seqlen=64,
                                                    eval_data=str(text_file), eval_seqlen=32, max_segments=2),
                       log=quiet)
    assert sorted(p.name for p in out.iterdir()) == ["model", "report.json", "report.md"]
    assert json.loads((out / "report.json").read_text())["export"]["format"] == "sparse-24-bitmask"
    v = r["verify"]
    assert v["pattern"] == {"matrices": 14, "groups": v["pattern"]["groups"], "violations": 0}
    assert v["round_trip"]["sparse_export"] == "bit-identical"
    assert v["perplexity"]["dense"] > 0 and v["perplexity"]["pruned"] > 0
    if not torch.cuda.is_available():
        assert "skipped" in r["benchmark"] and "Skipped: no CUDA GPU" in (out / "report.md").read_text()
    else:
        b = r["benchmark"]
        assert sorted(x["runtime"] for x in b["rows"]) == ["torch-cuda", "torch-sparse24"] and b["speedup"] > 0
        assert "2:4 speedup" in (out / "report.md").read_text()
    with pytest.raises(UserError, match="already exists"):
        run_gpu_target(tiny_dirs["llama"], out, gpu(calib=str(text_file), nsamples=4, seqlen=64), log=quiet)
    with pytest.raises(UserError, match="2:4"):
        run_gpu_target(tiny_dirs["llama"], tmp_path / "x", gpu(pattern="1:4", calib=str(text_file)), log=quiet)
    with pytest.raises(UserError, match="data file not found"):
        run_gpu_target(tiny_dirs["llama"], tmp_path / "x", gpu(calib=str(text_file), eval_data=str(tmp_path / "no")),
                       log=quiet)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_gpu_target_fails_on_a_bad_round_trip_and_leaves_nothing(tiny_dirs, text_file, tmp_path, monkeypatch):
    real = compressed_format.read_state_dict

    def off_by_one_bit(folder):
        sd = real(folder)
        w = sd["model.layers.1.mlp.down_proj.weight"]
        w.view(torch.int32)[0, 0] ^= 1
        return sd

    monkeypatch.setattr(compressed, "read_state_dict", off_by_one_bit)
    with pytest.raises(UserError, match="not bit-identical"):
        run_gpu_target(tiny_dirs["llama"], tmp_path / "gpu", gpu(calib=str(text_file), nsamples=4, seqlen=64),
                       log=quiet)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("method", ["distill", "blockwise"])
def test_gpu_target_recovers_with_the_2_4_mask_fixed(tiny_dirs, text_file, tmp_path, method):
    """--recover on the gpu target: the written checkpoint is the recovered model (its weights differ from the
    one-shot prune's), 2:4 still holds in every group (verify counts it in the files) with the one-shot zeros
    kept, and the report says how it was recovered; distill also measures the one-shot model beside it.
    (Block-wise prunes each later layer on the recovered layers' outputs, so its masks match the plain
    prune's in the first layer only.)"""
    from sparse_export.pruning.jobs import prune

    given = dict(calib=str(text_file), nsamples=4, seqlen=64)
    extra = dict(recover_steps=3, recover_data=str(text_file)) if method == "distill" else {}
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text(text_file.read_text()[::-1])          # other text than the training text
    out = tmp_path / method
    r = run_gpu_target(tiny_dirs["llama"], out, gpu(**given, recover=method, eval_data=str(eval_file),
                                                    eval_seqlen=32, max_segments=2, **extra), log=quiet)
    oneshot = tmp_path / "oneshot"
    prune(tiny_dirs["llama"], oneshot, gpu(**given).recipe, log=quiet)
    assert sorted(p.name for p in out.iterdir()) == ["model", "report.json", "report.md"]
    assert r["verify"]["pattern"]["violations"] == 0 and r["recovery"]["method"] == method
    written = compressed_format.read_state_dict(out / "model")
    base = compressed_format.read_state_dict(oneshot)
    moved = 0
    for name, w in base.items():
        if name.endswith("proj.weight") and (method == "distill" or ".layers.0." in name):
            got = written[name].float()
            assert torch.equal(got[w == 0], torch.zeros_like(got[w == 0])), name   # every one-shot zero kept
            moved += int(not torch.equal(got, w.float()))
    assert moved > 0
    text = (out / "report.md").read_text()
    assert "## Recovery" in text and "2:4 recovered" in text
    if method == "distill":
        assert r["recovery"]["steps"] == 3 and "one_shot" in r["verify"]["perplexity"]
        assert "2:4 one-shot" in text
