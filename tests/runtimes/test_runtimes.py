"""Runtime adapters (ONNX Runtime, torch, DeepSparse when installed) and the benchmark."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from sparse_export import runtimes
from sparse_export.measure import prefill
from sparse_export.pruning import jobs
from sparse_export.errors import UserError
from sparse_export.export.onnx_plain import export_onnx
from sparse_export.pruning.recipe import Recipe
from sparse_export.runtimes import get_runtime

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def folders(tiny_dirs, text_file, tmp_path_factory):
    """A dense and a 50% SparseGPT tiny llama, each as model folder and deployment folder."""
    root = tmp_path_factory.mktemp("rt")
    jobs.prune(tiny_dirs["llama"], root / "pruned", Recipe(calib=str(text_file), nsamples=4, seqlen=64), **QUIET)
    export_onnx(tiny_dirs["llama"], root / "onnx-dense", **QUIET)
    export_onnx(root / "pruned", root / "onnx-sparse", **QUIET)
    return {"dense_model": tiny_dirs["llama"], "pruned": root / "pruned",
            "dense": root / "onnx-dense", "sparse": root / "onnx-sparse"}


def _inputs(batch=2, seq=24):
    ids = np.random.default_rng(0).integers(0, 300, (batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    return ids, mask


def test_unknown_and_missing_runtimes_are_one_line_user_errors(monkeypatch, tmp_path):
    with pytest.raises(UserError, match="unknown runtime 'tvm'.*onnxruntime"):
        get_runtime("tvm")
    real = runtimes.importlib.util.find_spec
    monkeypatch.setattr(runtimes.importlib.util, "find_spec",
                        lambda n, *a: None if n == "deepsparse" else real(n, *a))
    with pytest.raises(UserError, match=r"needs the 'deepsparse' package.*pip install") as e:
        get_runtime("deepsparse")
    assert "\n" not in str(e.value)
    # an engine that is installed but fails to import
    (tmp_path / "broken_engine.py").write_text("raise ImportError('built for another numpy\\nmore')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(runtimes.RUNTIMES, "broken", ("onnxruntime_rt", "OnnxRuntime", "broken_engine", "x"))
    with pytest.raises(UserError, match="importing 'broken_engine' failed: built for another numpy$"):
        get_runtime("broken")


def test_onnxruntime_and_torch_agree_on_a_deployment(folders):
    ids, mask = _inputs()
    ort = get_runtime("onnxruntime")(folders["sparse"], batch=2, seqlen=24, threads=1)
    torch_rt = get_runtime("torch")(folders["sparse"], batch=2, seqlen=24)  # loads ../pruned
    a, b = ort.run(ids, mask), torch_rt.run(ids, mask)
    assert a.shape == (2, 1, 300) and ort.logits == "last"
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    assert ort.session.get_session_options().intra_op_num_threads == 1
    assert ort.name == "onnxruntime" and ort.version and ort.load_s >= 0
    # the same from the model folder, exported on the fly
    c = get_runtime("onnxruntime")(folders["pruned"], batch=2, seqlen=24).run(ids, mask)
    np.testing.assert_array_equal(a, c)


def test_torch_runtime_follows_a_moved_output_tree(folders, tmp_path):
    shutil.copytree(folders["sparse"], tmp_path / "onnx-sparse")
    shutil.copytree(folders["pruned"], tmp_path / "pruned")
    moved = get_runtime("torch")(tmp_path / "onnx-sparse", batch=2, seqlen=24)
    assert moved.module.lm.name_or_path == str((tmp_path / "pruned").resolve())


def test_missing_folder(tmp_path):
    with pytest.raises(UserError, match="folder not found"):
        get_runtime("onnxruntime")(tmp_path / "nope")


@pytest.mark.skipif(not runtimes.installed("deepsparse"), reason="deepsparse not installed")
def test_deepsparse_matches_torch_and_leaves_the_deployment_dynamic(folders):
    ids, mask = _inputs()
    before = (folders["sparse"] / "model.onnx").read_bytes()
    ds = get_runtime("deepsparse")(folders["sparse"], batch=2, seqlen=24, threads=1)
    ref = get_runtime("torch")(folders["sparse"], batch=2, seqlen=24).run(ids, mask)
    np.testing.assert_allclose(ds.run(ids, mask), ref, atol=1e-4, rtol=0)
    with pytest.raises(UserError, match="compiled for 2x24"):
        ds.run(ids[:, :10], mask[:, :10])
    assert (folders["sparse"] / "model.onnx").read_bytes() == before


def test_fixed_shape_copy_links_external_data(folders, tmp_path, monkeypatch):
    from sparse_export.export import graph as onnx_export
    from sparse_export.runtimes.deepsparse_rt import fixed_shape_copy

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    export_onnx(folders["pruned"], tmp_path / "ext", **QUIET)
    (tmp_path / "copy").mkdir()
    dst = fixed_shape_copy(tmp_path / "ext" / "model.onnx", 3, 17, tmp_path / "copy")
    proto = onnx.load(str(dst))  # loads the linked data too
    assert [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input] == [[3, 17]] * 2
    assert (tmp_path / "copy" / "model.onnx.data").is_symlink()
    src = onnx.load(str(tmp_path / "ext" / "model.onnx"), load_external_data=False)
    assert src.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_benchmark_table_json_and_plot(folders, tmp_path):
    res = prefill.benchmark_prefill({"model": folders["sparse"], "baseline": folders["dense"]}, ["torch"],
                          baseline="baseline", batch=1, seqlen=16, warmup=1, iterations=3, progress=False, **QUIET)
    rows = {(r["runtime"], r["model"]): r for r in res["rows"]}
    # onnxruntime joins for the dense reference even when not asked for
    assert set(rows) == {("torch", "model"), ("torch", "baseline"), ("onnxruntime", "baseline")}
    t, tb, o = rows["torch", "model"], rows["torch", "baseline"], rows["onnxruntime", "baseline"]
    assert t["speedup_vs_baseline"] == pytest.approx(tb["median_ms"] / t["median_ms"])
    assert t["speedup_vs_onnxruntime"] == pytest.approx(o["median_ms"] / t["median_ms"])
    assert t["min_ms"] <= t["median_ms"] <= t["p90_ms"] and t["cpu_ms"] > 0 and t["peak_rss_gib"] > 0
    assert t["tokens_per_s"] == pytest.approx(16 / t["median_ms"] * 1e3)
    assert "| torch | model |" in prefill.prefill_table(res)
    prefill.save_prefill(res, tmp_path / "r.json", tmp_path / "r.png")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert len(saved["rows"]) == 3 and saved["config"]["seqlen"] == 16
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_models_of_a_runtime_are_timed_interleaved(tmp_path, monkeypatch):
    """Each model is loaded and warmed up, then the timed rounds alternate between the models."""
    calls = []

    class Fake:
        version, logits, load_s = "0", "last", 0.0

        def __init__(self, folder, **kw):
            self.name = Path(folder).name
            calls.append(("load", self.name))

        def run(self, ids, mask):
            calls.append(("run", self.name))
            return np.zeros((1, 3), np.float32) + len(self.name)

        def close(self):
            calls.append(("close", self.name))

    monkeypatch.setattr(prefill, "get_runtime", lambda name: Fake)
    folders = {}
    for name in ("a", "bb"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"vocab_size": 10}')
        folders[name] = tmp_path / name
    res = prefill.benchmark_prefill(folders, ["onnxruntime"], baseline="a", batch=1, seqlen=4, warmup=2, iterations=3,
                          keep_outputs=True, progress=False, log=lambda *a: None)
    assert calls == [("load", "a"), ("run", "a"), ("run", "a"), ("load", "bb"), ("run", "bb"), ("run", "bb"),
                     *[("run", n) for _ in range(3) for n in ("a", "bb")], ("close", "a"), ("close", "bb")]
    assert [r["model"] for r in res["rows"]] == ["a", "bb"]
    assert [float(r["output"][0, 0]) for r in res["rows"]] == [1.0, 2.0]  # each model's own first output
