"""The CPU-target commands: export onnx, benchmark, prune-and-export (in-process, through main())."""

import json
import os
from pathlib import Path

import pytest

from sparse_export import runtimes
from sparse_export.cli.main import main


def _one_line_error(capsys, rc):
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def deployment(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "deploy"
    assert main(["export", "onnx", str(tiny_dirs["llama"]), "--out", str(out)]) == 0
    return out


def test_export_bad_input(tiny_dirs, tmp_path, capsys, deployment):
    cases = [
        (["export", "onnx", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "not found"),
        (["export", "onnx", str(tmp_path), "--out", str(tmp_path / "o")], "not a model folder"),
        (["export", "onnx", str(tiny_dirs["llama"]), "--out", str(deployment)], "already exists"),
        (["export", "onnx", str(tiny_dirs["llama"]), "--out", str(tmp_path / "o"), "--logits", "first"],
         "unknown logits variant"),
    ]
    for argv, says in cases:
        line = _one_line_error(capsys, main(argv))
        assert says in line, line
    assert not (tmp_path / "o").exists()


def test_benchmark_bad_input(tmp_path, capsys, deployment):
    cases = [
        (["benchmark", str(deployment), "--runtime", "tvm"], "unknown runtime 'tvm'"),
        (["benchmark", str(tmp_path / "missing"), "--runtime", "onnxruntime"], "folder not found"),
        (["benchmark", str(tmp_path), "--runtime", "onnxruntime", "--iterations", "1"], "not a model folder"),
        (["benchmark", str(deployment), "--runtime", "onnxruntime", "--iterations", "0"], ">= 1"),
    ]
    for argv, says in cases:
        line = _one_line_error(capsys, main(argv))
        assert says in line, line


def test_benchmark_writes_table_json_plot(deployment, tiny_dirs, tmp_path, capsys):
    rc = main(["benchmark", str(deployment), "--baseline", str(tiny_dirs["llama"]), "--runtime", "onnxruntime",
               "--seqlen", "16", "--warmup", "1", "--iterations", "2", "--threads", "1",
               "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")])
    assert rc == 0
    assert "| onnxruntime | baseline |" in capsys.readouterr().out
    res = json.loads((tmp_path / "b.json").read_text())
    assert [r["model"] for r in res["rows"]] == ["model", "baseline"]
    assert res["config"]["threads"] == 1 and (tmp_path / "b.png").stat().st_size > 1000


def test_prune_and_export_bad_input(tiny_dirs, text_file, tmp_path, capsys):
    base = ["prune-and-export", str(tiny_dirs["llama"]), "--calib", str(text_file)]
    taken = tmp_path / "taken"
    taken.mkdir()
    cases = [
        (base + ["--out", str(taken)], "already exists"),
        (base + ["--out", str(tmp_path / "o"), "--target", "tpu"], "unknown target 'tpu'"),
        (base + ["--out", str(tmp_path / "o"), "--runtime", "tvm"], "unknown runtime 'tvm'"),
        (["prune-and-export", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--calib", str(text_file)],
         "not found"),
        (["prune-and-export", str(tiny_dirs["llama"]), "--out", str(tmp_path / "o"), "--calib",
          str(tmp_path / "no.txt")], "data file not found"),
        (base + ["--out", str(tmp_path / "o"), "--sparsity", "1.5"], "sparsity"),
    ]
    for argv, says in cases:
        line = _one_line_error(capsys, main(argv))
        assert says in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def _paths_are_final(out):
    """No JSON in the output points into the temporary folder; every absolute path in it exists."""
    for path in [out / "report.json", *out.rglob("sparse_export.json")]:
        text = path.read_text()
        assert ".tmp-" not in text, path
        found = []

        def walk(x):
            if isinstance(x, dict):
                for v in x.values():
                    walk(v)
            elif isinstance(x, list):
                for v in x:
                    walk(v)
            elif isinstance(x, str) and x.startswith(str(out.parent)):
                found.append(x)

        walk(json.loads(text))
        assert all(Path(x).exists() for x in found), (path, found)
    r = json.loads((out / "report.json").read_text())
    assert all((out / f).exists() for f in r["benchmark"]["config"]["models"].values())


def _pipeline_args(tiny_dirs, text_file, out, extra=()):
    rts = [a for n in ("onnxruntime", "torch", "deepsparse") if runtimes.installed(n) for a in ("--runtime", n)]
    return ["prune-and-export", str(tiny_dirs["llama"]), "--target", "cpu", "--out", str(out), "--calib",
            str(text_file), "--nsamples", "4", "--seqlen", "64", "--eval-data", str(text_file), "--eval-seqlen",
            "64", "--max-segments", "2", "--bench-seqlen", "16", "--iterations", "2", "--threads", "1",
            "--prompt-tokens", "8", "--new-tokens", "4", *rts, *extra]


@pytest.mark.slow
def test_prune_and_export_cpu(tiny_dirs, text_file, tmp_path):
    out = tmp_path / "out"
    assert main(_pipeline_args(tiny_dirs, text_file, out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["dense-kv", "generate.png", "latency.png", "onnx-dense",
                                                     "onnx-sparse", "pruned-model", "report.json", "report.md",
                                                     "sparse-kv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind
    r = json.loads((out / "report.json").read_text())
    assert r["export"]["sparse"]["prunable_sparsity"] == pytest.approx(r["prune"]["pruned_sparsity"])
    assert r["export"]["dense"]["prunable_sparsity"] == 0
    checked = {(a["model"], a["runtime"]) for a in r["verify"]["agreement"]}
    installed = [n for n in ("onnxruntime", "torch", "deepsparse") if runtimes.installed(n)]
    assert checked == {(m, n) for m in ("dense", "sparse") for n in installed}
    assert all(a["max_abs_diff"] <= a["tolerance"] for a in r["verify"]["agreement"])
    assert set(r["verify"]["perplexity"]) == {"dense", "sparse"}
    md = (out / "report.md").read_text()
    for text in ("## Correctness", "## Perplexity", "## Speed", "## Against the paper", "1.82x", "latency.png",
                 "## Generation", "decode tok/s", "generate.png"):
        assert text in md
    # side by side: one line per model, its perplexity and its speedup on each runtime
    side = md.split("## Side by side")[1].split("##")[0]
    sparse_line = next(line for line in side.splitlines() if line.startswith("| sparse |"))
    assert f"| {r['verify']['perplexity']['sparse']['perplexity']:.2f} |" in sparse_line
    assert sparse_line.count("|") == 3 + 2 * len(installed)
    # generation (on by default): every KV-capable runtime, dense and sparse, speedup against dense
    gen = {(g["runtime"], g["model"]): g for g in r["generate"]["rows"]}
    kv_runtimes = [n for n in ("onnxruntime", "deepsparse") if runtimes.installed(n)]
    assert set(gen) == {(n, m) for n in kv_runtimes for m in ("dense", "sparse")}
    assert all(g["decode_tok_s"] > 0 and g["new_tokens"] == 4 for g in gen.values())
    assert gen[kv_runtimes[0], "dense"]["speedup_vs_baseline"] == 1
    assert gen[kv_runtimes[0], "sparse"]["sparsity"] == pytest.approx(r["export"]["sparse"]["prunable_sparsity"])
    # accuracy is always there: KL and top-1 against dense, greedy completions side by side
    acc = r["accuracy"]
    assert acc["sparse"]["kl_nats_per_token"] > 0 and 0 <= acc["sparse"]["top1_agreement"] <= 1
    assert len(acc["completions"]["dense"]) == len(acc["completions"]["sparse"]) == len(acc["completions"]["prompts"])
    for text in ("## Accuracy", "top-1 agreement", "Greedy completions", "## How to deploy this",
                 f"sparse-export generate {out}/sparse-kv", "Timing conditions" if not r["warnings"] else "WARNING"):
        assert text in md, text
    assert "trust" in r["benchmark"] and "trust" in r["generate"] and isinstance(r["warnings"], list)
    g = r["generate"]["rows"][0]
    assert g["decode_tok_s"] == pytest.approx(1000 / g["decode_ms_median"])   # one statistic, so they agree
    _paths_are_final(out)
    # the deployments stay usable where they are: torch finds ../pruned-model
    from sparse_export.runtimes import get_runtime

    assert get_runtime("torch")(out / "onnx-sparse", seqlen=16).module.lm.name_or_path == \
        str((out / "pruned-model").resolve())


@pytest.mark.slow
def test_prune_and_export_no_generate(tiny_dirs, text_file, tmp_path):
    out = tmp_path / "out"
    assert main(_pipeline_args(tiny_dirs, text_file, out, ["--no-generate"])) == 0
    assert not (out / "dense-kv").exists() and not (out / "generate.png").exists()
    assert json.loads((out / "report.json").read_text())["generate"] == {"skipped": "--no-generate"}
    assert "## Generation" not in (out / "report.md").read_text()


@pytest.mark.slow
def test_prune_and_export_failure_leaves_nothing(tiny_dirs, text_file, tmp_path, capsys, monkeypatch):
    from sparse_export.targets import cpu as cpu_target

    def fail(*a, **k):
        raise RuntimeError("engine crashed")

    monkeypatch.setattr(cpu_target, "benchmark_prefill", fail)
    rc = main(_pipeline_args(tiny_dirs, text_file, tmp_path / "out"))
    err = capsys.readouterr().err  # progress bars of the steps that ran, then the error
    assert rc != 0 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: RuntimeError: engine crashed")
    assert list(tmp_path.iterdir()) == []


def test_gpu_target_is_dispatched(tmp_path, monkeypatch):
    import sparse_export.targets as targets

    seen = {}
    monkeypatch.setattr(targets, "run_gpu_target", lambda model, out, opts, log: seen.update(opts=opts, model=model))
    assert main(["prune-and-export", "some/model", "--target", "gpu", "--out", str(tmp_path / "g")]) == 0
    assert seen["model"] == "some/model" and seen["opts"].recipe.pattern == "2:4"


@pytest.mark.slow
def test_a_crashing_engine_keeps_the_artifacts(tiny_dirs, text_file, tmp_path):
    """Defaults (all cores) on a tiny grouped-query Llama: DeepSparse 1.8 crashes on its KV-cache graph
    with more than one core. The run retries on one thread, reports what happened, keeps everything."""
    out = tmp_path / "out"
    rc = main(["prune-and-export", str(tiny_dirs["llama"]), "--out", str(out), "--calib", str(text_file),
               "--nsamples", "4", "--seqlen", "32", "--bench-seqlen", "16", "--iterations", "2",
               "--prompt-tokens", "8", "--new-tokens", "4"])
    assert rc == 0
    assert {"pruned-model", "onnx-dense", "onnx-sparse", "dense-kv", "sparse-kv", "report.md"} <= \
        {p.name for p in out.iterdir()}
    r = json.loads((out / "report.json").read_text())
    if runtimes.installed("deepsparse") and (os.cpu_count() or 1) > 1:
        crash = r["generate"]["crashes"][0]
        assert crash["runtime"] == "deepsparse" and "crashed" in crash["error"] and crash["retry"]
        assert any("deepsparse crashed" in w for w in r["warnings"])
        assert "## Engine crashes" in (out / "report.md").read_text()
    _paths_are_final(out)


@pytest.mark.slow
def test_a_crash_that_repeats_is_recorded(tiny_dirs, text_file, tmp_path, monkeypatch):
    """An engine that crashes on one thread too: its rows are missing, the crash is in the report, exit 0."""
    from sparse_export import isolate
    from sparse_export.errors import EngineCrash

    real = isolate.call

    def crash_onnxruntime(target, kwargs, what, hint="", child=True):
        if kwargs.get("runtime") == "onnxruntime" and "prefill" in target:
            raise EngineCrash("ONNX Runtime running dense, sparse crashed (SIGSEGV)")
        return real(target, kwargs, what, hint, child)

    monkeypatch.setattr(isolate, "call", crash_onnxruntime)
    out = tmp_path / "out"
    assert main(_pipeline_args(tiny_dirs, text_file, out, ["--no-generate"])) == 0
    r = json.loads((out / "report.json").read_text())
    crash = r["benchmark"]["crashes"][0]
    assert crash["runtime"] == "onnxruntime" and crash["retry"].startswith("none")   # it already had one thread
    assert not [x for x in r["benchmark"]["rows"] if x["runtime"] == "onnxruntime"]
    md = (out / "report.md").read_text()
    assert "## Engine crashes" in md and f"benchmark {out}/onnx-sparse" in md and "--runtime onnxruntime" in md
