"""prune-and-export's generation section on our own runtime: with --int8 (or --wbits) it times sparse-cpu on
the pruned folder beside sparse-cpu-dense on the dense model, and its deploy table says how to run them."""

import json

import pytest

from sparse_export.cli.main import main
from sparse_export.pruning import jobs
from sparse_export.pruning.recipe import Recipe
from sparse_export.targets import cpu as cpu_target
from sparse_export.targets.cpu_report import _deploy_guide, _generation_text
from sparse_export.targets.options import CpuOptions



@pytest.fixture(scope="module")
def pruned(tiny_dirs, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sc") / "pruned"
    jobs.prune(tiny_dirs["llama"], out, Recipe(sparsity=0.6, wbits=8, calib=str(text_file), nsamples=4, seqlen=32),
               threads=1, log=lambda *a: None)
    return out


def _opts():
    return CpuOptions(recipe=Recipe(wbits=8), int8=True, prompt_tokens=8, new_tokens=4, iterations=2, threads=1)


def test_sparse_cpu_rows_beside_the_dense_int8_baseline(tiny_dirs, pruned):
    res = cpu_target.sparse_cpu_generation(tiny_dirs["llama"], pruned, _opts(), None, log=lambda *a: None)
    rows = {r["runtime"]: r for r in res["rows"]}
    assert set(rows) == {"sparse-cpu", "sparse-cpu-dense"} and not res["crashes"]
    dense, sparse = rows["sparse-cpu-dense"], rows["sparse-cpu"]
    assert (dense["model"], sparse["model"]) == ("dense", "sparse")
    assert dense["folder"] == str(tiny_dirs["llama"]) and sparse["folder"] == str(pruned)
    assert sparse["sparsity"] == pytest.approx(json.loads((pruned / "sparse_export.json").read_text())["pruned_sparsity"])
    assert all(r["new_tokens"] == 4 and r["decode_tok_s"] > 0 for r in rows.values())
    # the pruned folder really ran as a bitmask and the dense one as dense int8: fewer weight bytes per token
    assert sparse["weight_bytes"]["read"] < dense["weight_bytes"]["read"]
    assert dense["speedup_vs_baseline"] == 1
    assert sparse["speedup_vs_baseline"] == pytest.approx(sparse["decode_tok_s"] / dense["decode_tok_s"])
    assert res["trust"] is not None
    # the report: what ran, and how to run it
    text = _generation_text(res)
    assert "| sparse-cpu-dense | dense |" in text and "| sparse-cpu | sparse |" in text
    guide = _deploy_guide({"model": "my/model", "export": {}, "generate": res}, "out")
    assert 'sparse-export generate out/pruned-model "The capital of France is" --runtime sparse-cpu`' in guide
    assert "sparse-export generate my/model" in guide and "--runtime sparse-cpu-dense" in guide
    assert "sparse-kv/" not in guide       # no KV-cache graphs were made


def test_kv_rows_are_kept_and_a_failure_is_recorded(tiny_dirs, tmp_path):
    """Added to generation_step's result; a failure (here: no pruned folder) is a recorded crash, not an error."""
    kv = {"config": {"prompt_tokens": 8, "new_tokens": 4}, "rows": [{"runtime": "onnxruntime", "model": "dense"}],
          "crashes": [], "trust": {"warnings": []}}
    res = cpu_target.sparse_cpu_generation(tiny_dirs["llama"], tmp_path / "missing", _opts(), kv,
                                           log=lambda *a: None)
    assert res["rows"] == [{"runtime": "onnxruntime", "model": "dense"}]
    assert res["crashes"][0]["runtime"] == "sparse-cpu" and "missing" in res["crashes"][0]["error"]


@pytest.mark.slow
def test_prune_and_export_int8_times_our_runtime(tiny_dirs, text_file, tmp_path):
    """--int8 --skip-fp32 in memory makes no KV-cache graph; our runtimes still give the Generation section."""
    out = tmp_path / "out"
    assert main(["prune-and-export", str(tiny_dirs["llama"]), "--target", "cpu", "--out", str(out), "--calib",
                 str(text_file), "--nsamples", "4", "--seqlen", "64", "--bench-seqlen", "16", "--warmup", "1",
                 "--iterations", "2", "--threads", "1", "--prompt-tokens", "8", "--new-tokens", "4",
                 "--runtime", "onnxruntime", "--int8", "--skip-fp32"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert {(g["runtime"], g["model"]) for g in r["generate"]["rows"]} == {("sparse-cpu-dense", "dense"),
                                                                           ("sparse-cpu", "sparse")}
    assert "KV-cache" in r["generate"]["kv_skipped"]
    md = (out / "report.md").read_text()
    assert "## Generation" in md and f"sparse-export generate {out}/pruned-model" in md
    assert (out / "generate.png").exists() and not (out / "sparse-kv").exists()
