"""prune-and-export --recover distill: the deployed model is the recovered one, the report shows the one-shot
model beside it, and the INT8 graph reads the recovered weights back on their grid."""

import json

import pytest

from sparse_export import models
from sparse_export.cli.main import main
from tests.targets.test_cpu import _pipeline_args
from tests.tiny import _make_text


@pytest.mark.slow
def test_prune_and_export_recover_distill(tiny_dirs, text_file, tmp_path):
    train = tmp_path / "train.txt"
    train.write_text(_make_text(300, seed=2))
    out = tmp_path / "out"
    args = _pipeline_args(tiny_dirs, text_file, out, ["--recover", "distill", "--recover-data", str(train),
                                                      "--recover-steps", "6", "--recover-lr", "3e-3", "--int8",
                                                      "--no-generate"])
    assert main(args) == 0
    names = {p.name for p in out.iterdir()}
    assert {"oneshot-model", "pruned-model", "onnx-int8", "onnx-sparse"} <= names and "recover-ckpt" not in names
    r = json.loads((out / "report.json").read_text())
    assert r["recovery"]["steps"] == 6 and r["recovery"]["data"] == str(train)
    assert set(r["verify"]["perplexity"]) >= {"dense", "one-shot", "sparse", "int8"}
    assert {"one-shot", "sparse"} <= set(r["accuracy"]) and len(r["accuracy"]["completions"]["one-shot"]) == 4
    meta = json.loads((out / "pruned-model" / "sparse_export.json").read_text())
    assert meta["recovery"]["method"] == "distill" and meta["recovery"]["grid"] is True
    # the zeros of the one-shot model are the recovered model's, and the deployed graph kept the sparsity
    a, _ = models.load_model(out / "oneshot-model")
    b, _ = models.load_model(out / "pruned-model")
    for n in models.prunable_names(a):
        wa, wb = models.weight_2d(a.get_submodule(n)), models.weight_2d(b.get_submodule(n))
        assert bool(((wa == 0) == (wb == 0)).all())
    assert r["export"]["sparse"]["prunable_sparsity"] == pytest.approx(meta["pruned_sparsity"])
    md = (out / "report.md").read_text()
    assert "| one-shot |" in md and "| sparse |" in md


def test_recover_option_checks(tiny_dirs, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_pipeline_args(tiny_dirs, text_file, out, ["--recover", "distill"])) == 2
    assert "eval-data" in capsys.readouterr().err
    assert main(_pipeline_args(tiny_dirs, text_file, out, ["--recover", "magic"])) == 2
    assert main(_pipeline_args(tiny_dirs, text_file, out, ["--recover-data", str(text_file)])) == 2
    assert not out.exists()
