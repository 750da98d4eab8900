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
