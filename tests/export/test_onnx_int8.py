"""INT8 deployment folders: the fused graph form, exact weights, and agreement with the
fake-quantized torch model in ONNX Runtime and DeepSparse.

Tolerance: the engines and torch compute the same integers, so outputs differ only by float
summation order and the rare activation that lands on the other side of a rounding step:
max |engine - torch| <= 1e-3 * max |torch logits| (measured: about 3e-7 on these models).
On a real model those few rounding differences spread through the layers; see
pipeline.INT8_NOISE_FACTOR for the check used there.
"""

import importlib.util
from collections import Counter

import numpy as np
import pytest
import torch

from sparse_export import models
from sparse_export.pruning.jobs import prune
from sparse_export.export.onnx_int8 import export_int8, read_qparams
from sparse_export.outputs import read_meta
from sparse_export.pruning.recipe import Recipe
from sparse_export.export.int8_calib import activation_ranges, fake_int8, grid_head, head_module, outlier_ratio

RTOL = 1e-3
QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def int8_dirs(tiny_dirs, text_file, tmp_path_factory):
    """{case: (model folder, int8 deployment folder)}."""
    root = tmp_path_factory.mktemp("int8")
    out = {}
    for case, arch, recipe in [("llama", "llama", dict(wbits=8)),
                               ("opt-per-tensor", "opt", dict(wbits=8, per_channel=False)),
                               ("gpt2", "gpt2", dict(wbits=8)),
                               ("llama-fp32-pruned", "llama", {})]:
        folder = root / f"{case}-pruned"
        prune(tiny_dirs[arch], folder, Recipe(calib=str(text_file), nsamples=4, seqlen=64, **recipe), **QUIET)
        export_int8(folder, root / f"{case}-int8", calib=str(text_file), nsamples=4, seqlen=64,
                    logits="all", **QUIET)
        out[case] = (folder, root / f"{case}-int8")
    return out


def load_graph(deploy):
    import onnx

    return onnx.load(str(deploy / "model.onnx"))


def fake_quant_logits(folder, deploy, ids, meta=None):
    """The torch model with grid weights and its activations quantized like the graph's."""
    model, _ = models.load_model(folder)
    meta = meta or read_meta(deploy)
    qp, attn = read_qparams(meta)
    if meta["int8"]["weight_source"] == "round-to-nearest":
        from sparse_export.pruning.grid import round_weights

        round_weights(model)
    if meta["int8"]["head"]["dtype"] == "int8":       # the LM head: its own per-row grid (untied)
        grid_head(model, meta["int8"]["head"]["module"])
    with torch.no_grad(), fake_int8(model, qp, attn):
        return model(input_ids=torch.from_numpy(ids)).logits.numpy()


def inputs(batch=2, seqlen=24, seed=0):
    ids = np.random.default_rng(seed).integers(1, 300, (batch, seqlen), dtype=np.int64)
    return ids, np.ones_like(ids)


@pytest.mark.parametrize("case", ["llama", "opt-per-tensor", "gpt2", "llama-fp32-pruned"])
def test_graph_uses_the_fused_form(case, int8_dirs):
    from onnx import numpy_helper

    folder, deploy = int8_dirs[case]
    g = load_graph(deploy).graph
    ops = Counter(n.op_type for n in g.node)
    model, _ = models.load_model(folder)
    names = models.prunable_names(model)
    attention = models.attention_names(model)
    assert len(attention) == (0 if case == "gpt2" else 2)     # gpt2's attention is not the standard form
    meta = read_meta(deploy)["int8"]
    assert meta["fp32_linear"] == []                          # tiny random models: no outliers
    assert sorted(meta["attention"]["qparams"]) == sorted(attention)
    assert meta["head"]["dtype"] == "int8" and meta["head"]["reason"] is None
    assert ops["MatMulInteger"] == len(names) + len(attention) + 1      # + the LM head
    assert ops["DequantizeLinear"] == 0 and ops["QLinearMatMul"] == 0
    assert ops["Softmax"] >= 2                               # softmax stays fp32
    inits = {t.name: t for t in g.initializer}
    by_input = {i: n for n in g.node for i in n.input}
    producer = {o: n for n in g.node for o in n.output}
    scores = 0
    for node in (n for n in g.node if n.op_type == "MatMulInteger"):
        cast = by_input[node.output[0]]
        mul = by_input[cast.output[0]]
        assert (cast.op_type, mul.op_type) == ("Cast", "Mul")
        assert producer[node.input[0]].op_type == "QuantizeLinear"
        if node.input[1] in inits:                           # a Linear layer: int8 weights
            assert numpy_helper.to_array(inits[node.input[1]]).dtype == np.int8
            continue
        # an attention score matmul: query and key both quantized here, the result goes on to softmax
        key_quant = producer[node.input[1]]
        assert key_quant.op_type == "QuantizeLinear"
        assert numpy_helper.to_array(inits[key_quant.input[2]]).dtype == np.int8
        after = mul
        while after.op_type != "Softmax":
            after = by_input[after.output[0]]
            assert after.op_type in ("Mul", "Add", "Softmax")
        scores += 1
    assert scores == len(attention)
    # no fp32 matrix is left in a MatMul (the LM head is int8 too); the other attention matmul reads no weights
    fp32_weights = [n for n in g.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
    assert len(fp32_weights) == 0
    # per-tensor weight scales give a scalar rescale (attention's rescale is always a scalar); the head's
    # is per vocabulary row
    head = meta["head"]["module"]
    muls = [numpy_helper.to_array(inits[n.input[1]]) for n in g.node if n.op_type == "Mul"
            and n.input[1].endswith(".rescale") and ".scores." not in n.input[1] and not n.input[1].startswith(head)]
    assert len(muls) == len(names)
    assert all((m.ndim == 0) == (case == "opt-per-tensor") for m in muls)


@pytest.mark.parametrize("case", ["llama", "opt-per-tensor"])
def test_int8_weights_are_exact_and_keep_every_zero(case, int8_dirs):
    from onnx import numpy_helper

    folder, deploy = int8_dirs[case]
    model, _ = models.load_model(folder)
    src = read_meta(folder)
    meta = read_meta(deploy)
    assert meta["int8"]["weight_source"] == "recorded"
    inits = {t.name: numpy_helper.to_array(t) for t in load_graph(deploy).graph.initializer}
    rows = {r["module"]: (name, r) for name, r in meta["weights"].items() if r.get("prunable")}
    for module in models.prunable_names(model):
        name, row = rows[module]
        ints = torch.from_numpy(inits[name].T.astype(np.float32))          # out x in
        scale = torch.tensor(src["matrices"][module]["scale"]).reshape(-1, 1)
        W = models.weight_2d(model.get_submodule(module))
        assert torch.equal(ints * scale, W), module
        assert row["zeros"] == int((W == 0).sum())
    assert meta["prunable_sparsity"] >= 0.5


@pytest.mark.parametrize("case", ["llama", "opt-per-tensor", "gpt2", "llama-fp32-pruned"])
def test_onnxruntime_matches_fake_quantized_torch(case, int8_dirs):
    from sparse_export.runtimes import get_runtime

    folder, deploy = int8_dirs[case]
    ids, mask = inputs()
    rt = get_runtime("onnxruntime")(deploy, batch=2, seqlen=24)
    out = rt.run(ids, mask)
    ref = fake_quant_logits(folder, deploy, ids)
    # per position: equal to float rounding, except where an activation sits on a rounding boundary of its
    # int8 grid and the two engines' float sums put it on different sides (seen once in 48 positions on this
    # machine: 2.5e-3 of the logits' range there, 2e-7 elsewhere); a real mismatch moves every position
    per_pos = np.abs(out - ref).max(axis=-1) / np.abs(ref).max()
    assert (per_pos <= RTOL).mean() >= 0.95, per_pos
    assert per_pos.max() <= 10 * RTOL, per_pos
    # and activations are really quantized: the model without it is much further away
    model, _ = models.load_model(folder)
    with torch.no_grad():
        fp32 = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(out - fp32).max() > 100 * np.quantile(per_pos, 0.9) * np.abs(ref).max()


@pytest.mark.skipif(importlib.util.find_spec("deepsparse") is None, reason="deepsparse not installed")
def test_deepsparse_matches_fake_quantized_torch(int8_dirs):
    from sparse_export.runtimes import get_runtime

    folder, deploy = int8_dirs["llama"]
    ids, mask = inputs(1, 32)
    rt = get_runtime("deepsparse")(deploy, batch=1, seqlen=32, threads=1)
    out = rt.run(ids, mask)
    ref = fake_quant_logits(folder, deploy, ids)
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= RTOL * np.abs(ref).max()


def test_percentile_ranges_clip_outliers(tiny_dirs):
    model, _ = models.load_model(tiny_dirs["llama"])
    names = models.prunable_names(model)[:3]
    ids = torch.randint(1, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    r = activation_ranges(model, ids, names, percentile=99.0)
    for n in names:
        assert r[n]["min"] < r[n]["lo"] < 0 < r[n]["hi"] < r[n]["max"]
        assert outlier_ratio(r[n]) > 1


def test_outlier_layers_stay_fp32(int8_dirs, text_file, tmp_path):
    """Layers past the outlier ratio keep an fp32 MatMul; the rest are int8; ORT still matches torch.
    (Attention kept fp32 here, so every MatMulInteger is a Linear layer.)"""
    from sparse_export import data
    from sparse_export.runtimes import get_runtime

    folder, _ = int8_dirs["llama"]
    model, tok = models.load_model(folder)
    names = models.prunable_names(model)
    windows = data.calibration_windows(str(text_file), tok, 4, 64, 0)
    ratios = sorted(outlier_ratio(r) for r in activation_ranges(model, windows, names).values())
    threshold = (ratios[len(ratios) // 2] + ratios[len(ratios) // 2 + 1]) / 2
    deploy = tmp_path / "d"
    meta = export_int8(folder, deploy, calib=str(text_file), nsamples=4, seqlen=64, logits="all",
                       outlier_ratio=threshold, attention=False, **QUIET)
    fp32 = meta["int8"]["fp32_linear"]
    assert meta["int8"]["attention"]["score_matmul"] == "fp32" and not meta["int8"]["attention"]["qparams"]
    assert 0 < len(fp32) < len(names)
    ops = Counter(n.op_type for n in load_graph(deploy).graph.node)
    head = [meta["int8"]["head"]["module"]] if meta["int8"]["head"]["dtype"] == "int8" else []
    assert ops["MatMulInteger"] == len(names) - len(fp32) + len(head)
    assert meta["int8"]["matmul_integer"] == len(names) - len(fp32)
    assert set(meta["int8"]["activations"]["qparams"]) == set(names) - set(fp32) | set(head)
    assert meta["prunable_matrices"] == len(names) and meta["prunable_sparsity"] >= 0.5
    ids, mask = inputs()
    out = get_runtime("onnxruntime")(deploy, batch=2, seqlen=24).run(ids, mask)
    ref = fake_quant_logits(folder, deploy, ids)
    assert np.abs(out - ref).max() <= RTOL * np.abs(ref).max()


# ---- CLI ----------------------------------------------------------------------------------

def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_cli_export_int8(int8_dirs, text_file, tmp_path, capsys):
    from sparse_export.cli.main import main

    folder, _ = int8_dirs["llama"]
    out = tmp_path / "d"
    rc = main(["export", "onnx", str(folder), "--int8", "--out", str(out), "--calib", str(text_file),
               "--nsamples", "2", "--calib-seqlen", "32"])
    assert rc == 0
    meta = read_meta(out)
    assert meta["int8"]["matmul_integer"] == 14 and meta["int8"]["weight_source"] == "recorded"
    assert meta["int8"]["calibration"]["nsamples"] == 2 and meta["logits"] == "last"
    assert meta["int8"]["attention"]["score_matmul"] == "int8" and len(meta["int8"]["attention"]["qparams"]) == 2
    assert meta["int8"]["max_error"] is None


def test_cli_export_int8_max_error(int8_dirs, text_file, tmp_path):
    """--max-error reaches the export: a tiny threshold keeps more Linear layers fp32 than none does."""
    from sparse_export.cli.main import main

    folder, _ = int8_dirs["llama"]
    base = ["export", "onnx", str(folder), "--int8", "--calib", str(text_file), "--nsamples", "2",
            "--calib-seqlen", "32", "--outlier-ratio", "0"]
    assert main(base + ["--out", str(tmp_path / "all")]) == 0
    assert main(base + ["--out", str(tmp_path / "cut"), "--max-error", "1e-9"]) == 0
    every, cut = read_meta(tmp_path / "all")["int8"], read_meta(tmp_path / "cut")["int8"]
    assert cut["max_error"] == 1e-9 and every["max_error"] is None
    assert cut["matmul_integer"] < every["matmul_integer"] == 14


@pytest.mark.parametrize("args,words", [
    (["--int8", "--kv-cache", "--no-stream", "--percentile", "30"], "--percentile"),   # the INT8 KV-cache graph
    (["--int8", "--kv-cache", "--no-stream", "--calib", "no/such/file.txt"], "not found"),
    (["--fp32-head"], "--int8 only"),
    (["--nsamples", "4"], "--int8 only"),
    (["--int8", "--calib", "no/such/file.txt"], "not found"),
    (["--int8", "--percentile", "30"], "--percentile"),
    (["--outlier-ratio", "3"], "--int8 only"),
    (["--fp32-attention"], "--int8 only"),
    (["--max-error", "0.01"], "--int8 only"),
    (["--int8", "--max-error", "0"], "--max-error must be > 0"),
    (["--int8", "--max-error", "0.01", "--stream"], "--max-error is not available with the streamed export"),
])
def test_cli_export_int8_bad_options(args, words, int8_dirs, tmp_path, capsys):
    from sparse_export.cli.main import main

    folder, _ = int8_dirs["llama"]
    out = tmp_path / "d"
    assert main(["export", "onnx", str(folder), "--out", str(out), *args]) == 2
    assert words in one_line_error(capsys)
    assert not out.exists()


def test_cli_int8_needs_the_cpu_target(tiny_dirs, text_file, tmp_path, capsys):
    from sparse_export.cli.main import main

    out = tmp_path / "p"
    rc = main(["prune-and-export", str(tiny_dirs["llama"]), "--target", "gpu", "--int8", "--out", str(out),
               "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32"])
    assert rc == 2
    assert "--int8 is for the cpu target" in one_line_error(capsys)
    assert not out.exists()


def test_cli_fp32_attention_needs_int8(tiny_dirs, text_file, tmp_path, capsys):
    from sparse_export.cli.main import main

    out = tmp_path / "p"
    rc = main(["prune-and-export", str(tiny_dirs["llama"]), "--fp32-attention", "--out", str(out),
               "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32"])
    assert rc == 2
    assert "--fp32-attention applies to --int8 only" in one_line_error(capsys)
    assert not out.exists()


def test_graph_quantizes_the_attention_scores_like_torch(int8_dirs):
    """The graph's int8 score matmuls compute what quant.fake_int8 does in torch: ONNX Runtime agrees
    with the torch model whose query/key are fake-quantized far better than with the one whose are not."""
    from sparse_export.runtimes import get_runtime

    folder, deploy = int8_dirs["llama"]
    ids, mask = inputs()
    out = get_runtime("onnxruntime")(deploy, batch=2, seqlen=24).run(ids, mask)
    with_attn = fake_quant_logits(folder, deploy, ids)
    meta = read_meta(deploy)
    meta["int8"]["attention"]["qparams"] = {}
    without = fake_quant_logits(folder, deploy, ids, meta=meta)
    err = np.abs(out - with_attn).max()
    assert err <= RTOL * np.abs(with_attn).max()
    assert np.abs(with_attn - without).max() > 20 * err


@pytest.mark.parametrize("max_error", [None, 1e-9])
def test_prune_and_export_int8_report(tiny_dirs, text_file, tmp_path, capsys, max_error):
    import json

    from sparse_export.cli.main import main

    out = tmp_path / "p"
    extra = [] if max_error is None else ["--int8-max-error", str(max_error)]
    rc = main(["prune-and-export", str(tiny_dirs["llama"]), "--target", "cpu", "--sparsity", "0.5", "--int8",
               "--out", str(out), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "64",
               "--eval-data", str(text_file), "--eval-seqlen", "64", "--max-segments", "2",
               "--runtime", "onnxruntime", "--iterations", "2", "--bench-seqlen", "32", "--threads", "1", "--no-generate",
               *extra])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["wbits"] == 8
    assert set(report["verify"]["perplexity"]) == {"dense", "sparse", "int8"}
    assert {r["model"] for r in report["benchmark"]["rows"]} == {"dense", "sparse", "int8"}
    q = read_meta(out / "onnx-int8")["int8"]
    assert q["max_error"] == max_error
    if max_error:   # a threshold no layer meets: every Linear stays fp32, and the report says why
        assert q["matmul_integer"] < 14 and "relative squared error" in (out / "report.md").read_text()
        return
    assert q["matmul_integer"] == 14
    md = (out / "report.md").read_text()
    assert "int8" in md and "MatMulInteger" in md and "Attention score matmuls (query x key): int8" in md
    assert report["export"]["int8"]["quant"]["attention"] == {
        "score_matmul": "int8", "query": "uint8 per-tensor", "key": "int8 symmetric per-tensor",
        "probabilities_x_values": "fp32"}
    side = md.split("## Side by side")[1].split("##")[0]  # perplexity and speed of the three models together
    assert [line.split("|")[1].strip() for line in side.strip().splitlines()[2:5]] == ["dense", "sparse", "int8"]
    assert f"| {report['verify']['perplexity']['int8']['perplexity']:.2f} |" in side


# ---- the LM head -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["llama", "opt-per-tensor", "gpt2"])
def test_lm_head_is_int8_with_per_row_scales(case, int8_dirs):
    """The head's MatMul reads its own int8 initializer (vocab rows on a round-to-nearest grid, one scale
    per row); a tied model's embedding Gather keeps the fp32 table."""
    from onnx import numpy_helper

    folder, deploy = int8_dirs[case]
    model, _ = models.load_model(folder)
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert tied == (case != "llama")                     # opt and gpt2 tie their embeddings
    embedding = model.get_input_embeddings().weight.detach().numpy().copy()
    meta = read_meta(deploy)["int8"]
    hn = head_module(model)
    assert meta["head"] | {"input_outlier_ratio": 0} == {
        "module": hn, "tied_embeddings": tied, "dtype": "int8", "reason": None, "input_outlier_ratio": 0,
        "weights": "int8 symmetric, one scale per vocabulary row, round-to-nearest"}
    assert hn in meta["activations"]["qparams"]
    assert "LM head" not in meta["fp32_ops"]
    g = load_graph(deploy).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    node = next(n for n in g.node if n.op_type == "MatMulInteger" and n.input[1] == f"{hn}.weight_int8")
    ints = inits[node.input[1]]
    assert ints.dtype == np.int8 and ints.shape == (model.config.hidden_size, model.config.vocab_size)
    grid_head(model, hn)
    W = models.weight_2d(model.get_submodule(hn)).numpy()            # vocab x hidden, on its grid
    scale = np.abs(W).max(axis=1) / 127
    assert np.allclose(ints.T.astype(np.float32) * scale[:, None], W, atol=1e-6 * np.abs(W).max())
    assert np.abs(ints).max() == 127
    rescale = inits[f"{hn}.rescale"]
    assert rescale.shape == (model.config.vocab_size,)
    gathers = [n for n in g.node if n.op_type == "Gather" and n.input[0] in inits and inits[n.input[0]].ndim == 2]
    tables = [inits[n.input[0]] for n in gathers if inits[n.input[0]].shape == embedding.shape]
    assert len(tables) == 1 and tables[0].dtype == np.float32 and np.array_equal(tables[0], embedding)
    row = read_meta(deploy)["weights"][f"{hn}.weight_int8"]
    assert row["module"] == hn and row["op"] == "MatMulInteger" and not row["prunable"]


def test_fp32_head_flag_keeps_the_head_fp32(int8_dirs, text_file, tmp_path):
    """--fp32-head: the head stays an fp32 MatMul, recorded in the metadata; the rest is as before."""
    from sparse_export.cli.main import main
    from sparse_export.runtimes import get_runtime

    folder, _ = int8_dirs["opt-per-tensor"]
    out = tmp_path / "d"
    assert main(["export", "onnx", str(folder), "--int8", "--fp32-head", "--logits", "all", "--out", str(out),
                 "--calib", str(text_file), "--nsamples", "4", "--calib-seqlen", "64"]) == 0
    meta = read_meta(out)
    model, _ = models.load_model(folder)
    hn = head_module(model)
    assert meta["int8"]["head"]["dtype"] == "fp32" and meta["int8"]["head"]["reason"] == "--fp32-head"
    assert hn not in meta["int8"]["activations"]["qparams"] and "LM head" in meta["int8"]["fp32_ops"]
    g = load_graph(out).graph
    inits = {t.name for t in g.initializer}
    ops = Counter(n.op_type for n in g.node)
    assert ops["MatMulInteger"] == len(models.prunable_names(model)) + len(models.attention_names(model))
    assert len([n for n in g.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]) == 1
    ids, mask = inputs()
    got = get_runtime("onnxruntime")(out, batch=2, seqlen=24).run(ids, mask)
    ref = fake_quant_logits(folder, out, ids)
    assert np.abs(got - ref).max() <= RTOL * np.abs(ref).max()
    assert main(["export", "onnx", str(folder), "--fp32-head", "--out", str(tmp_path / "e")]) != 0


def test_head_with_outlier_inputs_stays_fp32(int8_dirs, text_file, tmp_path):
    """The decoder Linears' outlier test applies to the head: past the limit it stays fp32, and says why."""
    folder, _ = int8_dirs["llama"]
    meta = export_int8(folder, tmp_path / "d", calib=str(text_file), nsamples=4, seqlen=64, logits="all",
                       outlier_ratio=1.0, **QUIET)["int8"]
    assert meta["head"]["dtype"] == "fp32" and "99.99th percentile" in meta["head"]["reason"]
    assert meta["head"]["input_outlier_ratio"] > 1.0 and "LM head" in meta["fp32_ops"]
    assert meta["head"]["module"] not in meta["activations"]["qparams"]


def test_head_int8_costs_little_against_fp32_head(int8_dirs, text_file, tmp_path):
    """The int8 head moves the logits by about what the int8 Linears do, not more: the graph with it stays
    within the int8 tolerance of the fake-quantized torch model that keeps the head fp32."""
    from sparse_export.export.validate import int8_tolerance
    from sparse_export.runtimes import get_runtime

    folder, deploy = int8_dirs["llama"]
    ids, mask = inputs()
    got = get_runtime("onnxruntime")(deploy, batch=2, seqlen=24).run(ids, mask)
    meta = read_meta(deploy)
    ref = fake_quant_logits(folder, deploy, ids)
    meta["int8"]["head"]["dtype"] = "fp32"
    meta["int8"]["activations"]["qparams"].pop(meta["int8"]["head"]["module"])
    fp32_head = fake_quant_logits(folder, deploy, ids, meta=meta)
    model, _ = models.load_model(folder)
    with torch.no_grad():
        fp32 = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(got - ref).max() <= RTOL * np.abs(ref).max()
    assert 0 < np.abs(got - fp32_head).max() <= int8_tolerance(ref, fp32)
