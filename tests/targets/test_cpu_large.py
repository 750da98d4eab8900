"""`prune-and-export --target cpu` on the streamed (large-model) path, on a tiny Llama safetensors folder:
forced with --stream or by a tiny --memory-budget, ONNX Runtime only, few tokens."""

import json

import numpy as np
import pytest

from sparse_export import runtimes
from sparse_export.cli.main import main
from sparse_export.data import random_tokens
from sparse_export.export.validate import onnxruntime_session

pytestmark = pytest.mark.skipif(not runtimes.installed("onnxruntime"), reason="needs onnxruntime")


def _args(model, text_file, out, extra=()):
    return ["prune-and-export", str(model), "--target", "cpu", "--out", str(out), "--calib", str(text_file),
            "--nsamples", "4", "--seqlen", "64", "--eval-data", str(text_file), "--eval-seqlen", "64",
            "--max-segments", "2", "--bench-seqlen", "16", "--warmup", "1", "--iterations", "2", "--threads", "1",
            "--prompt-tokens", "8", "--new-tokens", "4", "--runtime", "onnxruntime", *extra]


def _one_line_error(capsys, rc):
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _report(out):
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


@pytest.fixture(scope="module")
def runs(tiny_dirs, text_file, tmp_path_factory):
    """The same tiny model through the in-memory path and the streamed one (--stream, generation on)."""
    root = tmp_path_factory.mktemp("large")
    small, streamed = root / "small", root / "streamed"
    assert main(_args(tiny_dirs["llama"], text_file, small, ["--no-generate"])) == 0
    assert main(_args(tiny_dirs["llama"], text_file, streamed, ["--stream"])) == 0
    return {"small": small, "streamed": streamed}


@pytest.mark.slow
def test_streamed_path_end_to_end(runs):
    out = runs["streamed"]
    assert sorted(p.name for p in out.iterdir()) == ["dense-kv", "generate.png", "latency.png", "onnx-dense",
                                                     "onnx-sparse", "pruned-model", "report.json", "report.md",
                                                     "sparse-kv"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]   # no temporary folder left
    r, md = _report(out)
    # the prune and every export took the streamed path, and their metadata says so
    assert r["plan"]["streamed"] and r["prune"]["streamed"]
    assert json.loads((out / "pruned-model" / "sparse_export.json").read_text())["streamed"] is True
    for folder in ("onnx-dense", "onnx-sparse", "dense-kv", "sparse-kv"):
        assert "streamed" in json.loads((out / folder / "sparse_export.json").read_text()), folder
    assert r["export"]["sparse"]["streamed"] and r["export"]["dense"]["streamed"]
    # the pruned sparsity is in the artifact, counted in the file
    assert r["prune"]["pruned_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert r["export"]["sparse"]["prunable_sparsity"] == pytest.approx(r["prune"]["pruned_sparsity"])
    assert r["export"]["dense"]["prunable_sparsity"] == 0
    # correctness from what the streamed exports recorded; perplexity streamed; generation measured
    assert {a["model"] for a in r["verify"]["agreement"]} == {"dense", "sparse"}
    assert all(a["max_abs_diff"] <= a["tolerance"] and a["layers_checked"] == 2 for a in r["verify"]["agreement"])
    assert {k: v["streamed"] for k, v in r["verify"]["perplexity"].items()} == {"dense": True, "sparse": True}
    assert {(g["runtime"], g["model"]) for g in r["generate"]["rows"]} == {("onnxruntime", "dense"),
                                                                           ("onnxruntime", "sparse")}
    # the whole-model torch steps are skipped, in one line that says why
    assert r["accuracy"] == {}
    assert "## Accuracy" not in md and "Greedy completions" not in md
    section = md.split("## Skipped on the streamed path")[1].split("##")[0].strip()
    assert len(section.splitlines()) == 1
    assert "whole-model torch forward" in section and "Accuracy" in section and "completions" in section
    for text in ("## Correctness", "layer by layer", "## Perplexity", "## Speed", "## Generation"):
        assert text in md, text


@pytest.mark.slow
def test_streamed_sparse_graph_equals_the_in_memory_one(runs):
    """Same model, same recipe: the streamed target's onnx-sparse/ gives the small path's logits."""
    ids, mask = random_tokens(300, 2, 24)
    got = {k: onnxruntime_session(out / "onnx-sparse" / "model.onnx").run(
        None, {"input_ids": ids, "attention_mask": mask})[0] for k, out in runs.items()}
    assert float(np.abs(got["streamed"] - got["small"]).max()) <= 1e-5
    small, streamed = _report(runs["small"])[0], _report(runs["streamed"])[0]
    assert not small["plan"]["streamed"] and not small["export"]["sparse"]["streamed"]
    assert streamed["prune"]["pruned_sparsity"] == pytest.approx(small["prune"]["pruned_sparsity"])


@pytest.mark.slow
def test_skip_fp32_leaves_only_int8(tiny_dirs, text_file, tmp_path):
    """A tiny --memory-budget streams the export (the prune stays in memory by its own rule). Without fp32
    graphs the baseline is the dense model's INT8 graph, and generation runs on INT8 KV-cache graphs."""
    out = tmp_path / "out"
    assert main(_args(tiny_dirs["llama"], text_file, out, ["--memory-budget", "0.001", "--int8", "--skip-fp32"])) == 0
    assert sorted(p.name for p in out.iterdir()) == ["dense-kv", "generate.png", "latency.png", "onnx-dense-int8",
                                                     "onnx-int8", "pruned-model", "report.json", "report.md",
                                                     "sparse-kv"]
    for graph in out.rglob("*.onnx"):                # no fp32 graph anywhere: every Linear an int8 matmul
        meta = json.loads((graph.parent / "sparse_export.json").read_text())
        assert meta["int8"]["matmul_integer"] > 0 and meta["int8"]["head"]["dtype"] == "int8", graph
    r, md = _report(out)
    assert r["plan"]["streamed"] and not r["prune"]["streamed"] and r["export"]["int8"]["streamed"]
    assert r["plan"]["skip_fp32"] == "--skip-fp32" and set(r["export"]) == {"dense-int8", "int8"}
    rows = {x["model"]: x for x in r["benchmark"]["rows"]}
    assert set(rows) == {"dense-int8", "int8"} and rows["dense-int8"]["speedup_vs_baseline"] == pytest.approx(1.0)
    assert r["export"]["int8"]["prunable_sparsity"] == pytest.approx(r["prune"]["pruned_sparsity"])
    assert r["export"]["dense-int8"]["prunable_sparsity"] < 0.01
    assert "fp32 graphs (`onnx-dense/`, `onnx-sparse/`) not exported or benchmarked: --skip-fp32" in md
    assert "onnx-dense-int8/" in md and "KV-cache graphs of Generation are INT8" in md
    assert {x["model"] for x in r["generate"]["rows"]} == {"dense", "sparse"}


@pytest.mark.slow
def test_fp32_that_does_not_fit_is_skipped_with_int8(tiny_dirs, text_file, tmp_path, capsys, monkeypatch):
    from sparse_export.targets import cpu_large

    monkeypatch.setattr(cpu_large, "machine_ram", lambda: 1024)   # 1 KiB of RAM: no fp32 graph fits
    line = _one_line_error(capsys, main(_args(tiny_dirs["llama"], text_file, tmp_path / "a", ["--stream"])))
    assert "would not fit" in line and "--int8 --skip-fp32" in line
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "b"
    assert main(_args(tiny_dirs["llama"], text_file, out, ["--stream", "--int8", "--no-generate"])) == 0
    r, md = _report(out)
    assert set(r["export"]) == {"dense-int8", "int8"} and r["plan"]["skip_fp32"].startswith("the fp32 graphs would not fit")
    assert "machine's" in r["plan"]["skip_fp32"] and "not exported or benchmarked: the fp32 graphs would not fit" in md


@pytest.mark.parametrize("extra,says", [
    (["--skip-fp32"], "--skip-fp32 leaves only the INT8 graph: it needs --int8"),
    (["--memory-budget", "0"], "--memory-budget must be > 0"),
    (["--stream", "--runtime", "torch"], "--runtime torch runs the whole model in torch"),
    (["--stream", "--int8", "--int8-max-error", "0.003"], "--int8-max-error is not available on the streamed path"),
])
def test_bad_input(tiny_dirs, text_file, tmp_path, capsys, extra, says):
    line = _one_line_error(capsys, main(_args(tiny_dirs["llama"], text_file, tmp_path / "o", extra)))
    assert says in line, line
    assert list(tmp_path.iterdir()) == []


def test_gpu_target_refuses_the_cpu_only_flags(tmp_path, capsys):
    for extra in (["--skip-fp32"], ["--stream"], ["--memory-budget", "4"]):
        line = _one_line_error(capsys, main(["prune-and-export", "some/model", "--target", "gpu", "--out",
                                             str(tmp_path / "g"), *extra]))
        assert "applies to the cpu target only" in line, line


@pytest.mark.slow
def test_skip_fp32_in_memory(tiny_dirs, text_file, tmp_path):
    """--skip-fp32 on the in-memory path: no fp32 graph, the torch-side sections stay."""
    out = tmp_path / "out"
    assert main(_args(tiny_dirs["llama"], text_file, out, ["--int8", "--skip-fp32", "--no-generate"])) == 0
    assert sorted(p.name for p in out.iterdir()) == ["latency.png", "onnx-int8", "pruned-model", "report.json",
                                                     "report.md"]
    r, md = _report(out)
    assert not r["plan"]["streamed"] and set(r["export"]) == {"int8"}
    assert {a["model"] for a in r["verify"]["agreement"]} == {"int8"}
    assert "int8" in r["accuracy"] and "## Accuracy" in md and "Skipped on the streamed path" not in md
    assert "not exported or benchmarked: --skip-fp32" in md
