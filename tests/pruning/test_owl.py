"""--allocation owl end to end on tiny models: in memory and streamed give the same model, the per-layer
sparsities are recorded and hold in the checkpoint, --resume keeps the allocation, bad input is one line."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparse_export import data, models
from sparse_export.cli.main import main
from sparse_export.pruning import stream
from sparse_export.pruning.allocation import owl_sparsities
from sparse_export.pruning.driver import layer_modules, owl_allocation, prune_model
from sparse_export.pruning.jobs import prune
from sparse_export.pruning.recipe import Recipe
from sparse_export.pruning.stream import STATE_FILE, work_dir
from sparse_export.targets.cpu_report import _allocation
from tests.pruning.test_stream import assert_same_weights, save_sharded
from tests.tiny import tiny_model


def quiet(*_):
    pass


def recipe(text_file, **kw):
    return Recipe(calib=str(text_file), nsamples=4, seqlen=32, allocation="owl", **{"sparsity": 0.6, **kw})


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory, tokenizer):
    return save_sharded("llama", tmp_path_factory.mktemp("owl") / "m", tokenizer, layers=4)


def layer_zeros(folder, layer):
    model = AutoModelForCausalLM.from_pretrained(folder)
    mats = [models.weight_2d(m) for n, m in model.named_modules()
            if models.prunable(m) and n.startswith(f"model.layers.{layer}.")]
    return sum(int((w == 0).sum()) for w in mats), sum(w.numel() for w in mats)


@pytest.mark.parametrize("method", ["sparsegpt", "alps"])
def test_streamed_equals_in_memory_and_the_plan_holds(method, four_layers, text_file, tmp_path):
    r = recipe(text_file, method=method, owl_lambda=0.1, alps_iters=5)
    a = prune(four_layers, tmp_path / "mem", r, stream=False, log=quiet)
    b = prune(four_layers, tmp_path / "str", r, stream=True, log=quiet)
    assert_same_weights(tmp_path / "mem", tmp_path / "str")
    assert a["allocation"] == b["allocation"]
    saved = json.loads((tmp_path / "str" / "sparse_export.json").read_text())["allocation"]
    assert saved == b["allocation"] and saved["method"] == "owl" and saved["lambda"] == 0.1
    layers = saved["layers"]
    assert len(layers) == 4 and len({round(x["sparsity"], 9) for x in layers}) > 1
    want = owl_sparsities([x["outlier_ratio"] for x in layers], [x["weights"] for x in layers], 0.6, 0.1)
    assert [x["sparsity"] for x in layers] == pytest.approx(want)
    # the checkpoint itself: each layer at its planned sparsity, all together at the requested one;
    # rounding is at most one weight per matrix and per 128-column block (SparseGPT's mask blocks)
    zeros = total = 0
    for x in layers:
        z, n = layer_zeros(tmp_path / "str", x["layer"])
        assert z == pytest.approx(x["measured_sparsity"] * n)
        assert abs(z / n - x["sparsity"]) <= 16 / n
        zeros, total = zeros + z, total + n
    assert abs(zeros / total - 0.6) <= 64 / total
    assert b["pruned_sparsity"] == pytest.approx(zeros / total)


def test_more_outliers_keep_more_weights(tokenizer, text_file):
    """A layer whose inputs carry a massive channel gets the lowest sparsity."""
    model = tiny_model("llama", len(tokenizer))
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[5] = 200.0
    calib = data.calibration_windows(text_file, tokenizer, 4, 32, 0)
    allocation = {}
    prune_model(model, calib, recipe(text_file), progress=False, allocation=allocation)
    ratios = [x["outlier_ratio"] for x in allocation["layers"]]
    sparsities = [x["sparsity"] for x in allocation["layers"]]
    assert ratios[1] > ratios[0] and sparsities[1] < sparsities[0]
    assert sparsities == pytest.approx([0.6 + 0.08, 0.6 - 0.08])


def test_ratios_come_from_the_dense_model(tokenizer, text_file):
    """The plan does not depend on the pruner: owl_allocation on the dense model gives prune_model's."""
    calib = data.calibration_windows(text_file, tokenizer, 4, 32, 0)
    from sparse_export.layerwise import capture_first_layer_inputs

    model = tiny_model("llama", len(tokenizer))
    hidden, kwargs = capture_first_layer_inputs(model, calib, 4)
    targets = set(models.prunable_names(model))
    plan = owl_allocation(model, hidden, kwargs, targets, recipe(text_file), torch.device("cpu"), progress=False)
    for method in ("sparsegpt", "wanda"):
        got = {}
        prune_model(tiny_model("llama", len(tokenizer)), calib, recipe(text_file, method=method), progress=False,
                    allocation=got)
        assert got == plan
    assert set(layer_modules(model, 0, targets)) <= targets


def test_resume_keeps_the_allocation_and_gives_the_same_model(four_layers, text_file, tmp_path, monkeypatch):
    r = recipe(text_file)
    prune(four_layers, tmp_path / "whole", r, stream=True, log=quiet)
    real = stream.prune_layer
    calls = {"layers": 0, "owl": 0}
    real_owl = stream._owl_pass

    def owl_pass(*a, **kw):
        calls["owl"] += 1
        return real_owl(*a, **kw)

    def dies_at_layer_2(*a, **kw):
        calls["layers"] += 1
        if calls["layers"] == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(stream, "_owl_pass", owl_pass)
    monkeypatch.setattr(stream, "prune_layer", dies_at_layer_2)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        prune(four_layers, out, r, stream=True, log=quiet)
    state = json.loads((work_dir(out) / STATE_FILE).read_text())
    assert state["done"] == 2 and state["allocation"]["method"] == "owl" and calls["owl"] == 1
    meta = prune(four_layers, out, r, stream=True, resume=True, log=quiet)
    assert calls["owl"] == 1 and meta["resumed_at_layer"] == 2
    assert_same_weights(tmp_path / "whole", out)
    whole = json.loads((tmp_path / "whole" / "sparse_export.json").read_text())["allocation"]
    assert meta["allocation"] == whole
    # another lambda is another run: its work folder is not resumed
    calls["layers"] = 0
    with pytest.raises(KeyboardInterrupt):
        prune(four_layers, tmp_path / "again", r, stream=True, log=quiet)
    with pytest.raises(Exception, match="different run"):
        prune(four_layers, tmp_path / "again", recipe(text_file, owl_lambda=0.05), stream=True, resume=True,
              log=quiet)


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def one_line_error(code, err):
    """Exit != 0, no traceback, and one error line: the last (the OWL pass's progress bar may come before)."""
    lines = [x for x in err.strip().splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    return code != 0 and len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err


@pytest.mark.parametrize("extra,expect", [
    (["--allocation", "owl", "--pattern", "2:4"], "pattern"),
    (["--allocation", "owl", "--sparsity", "0.3", "--owl-lambda", "0.45"], "owl-lambda"),   # after the pass
    (["--allocation", "owl", "--owl-lambda", "-0.1"], "owl-lambda"),
    (["--allocation", "owls"], "allocation"),
    (["--method", "wanda", "--wbits", "8"], "wbits"),
    (["--method", "alps", "--alps-iters", "0"], "alps-iters"),
    (["--method", "alps", "--alps-cg-iters", "-1"], "alps-cg-iters"),
])
@pytest.mark.parametrize("streamed", [False, True])
def test_cli_bad_input_is_one_line(extra, expect, streamed, four_layers, text_file, tmp_path, capsys):
    out = tmp_path / "o"
    code, err = run_cli(["prune", four_layers, "--out", out, "--calib", text_file, "--nsamples", "4",
                         "--seqlen", "32", "--stream" if streamed else "--no-stream"] + extra, capsys)
    assert one_line_error(code, err) and expect in err, err
    assert not out.exists() and not work_dir(out).exists()


def test_prune_and_export_refuses_owl_with_a_pattern(four_layers, text_file, tmp_path, capsys):
    code, err = run_cli(["prune-and-export", four_layers, "--out", tmp_path / "o", "--calib", text_file,
                         "--allocation", "owl", "--pattern", "2:4"], capsys)
    assert one_line_error(code, err) and "pattern" in err


def test_report_lists_each_layer():
    a = {"method": "owl", "threshold": 5.0, "lambda": 0.08, "target_sparsity": 0.7, "planned_sparsity": 0.7,
         "measured_on": "dense model, calibration text",
         "layers": [{"layer": 0, "outlier_ratio": 0.01, "sparsity": 0.78, "weights": 10, "measured_sparsity": 0.779},
                    {"layer": 1, "outlier_ratio": 0.03, "sparsity": 0.62, "weights": 10,
                     "measured_sparsity": 0.621}]}
    text = _allocation(a)
    assert "| 0 | 1.00% | 78.0% | 77.9% |" in text and "| 1 | 3.00% | 62.0% | 62.1% |" in text
