"""Graph perplexity (measure/graph_ppl.py): the ONNX graph run on the same windows as evaluate.py gives
torch's perplexity for an fp32 graph, the fake-quantized torch model's for an int8 graph, and refuses a
graph without every position's logits."""

import math

import numpy as np
import pytest
import torch

from sparse_export import models
from sparse_export.errors import UserError
from sparse_export.evaluate import evaluate
from sparse_export.export.int8_calib import fake_int8
from sparse_export.export.onnx_int8 import export_int8, read_qparams
from sparse_export.export.onnx_plain import export_onnx
from sparse_export.measure.graph_ppl import graph_perplexity, window_nll
from sparse_export.outputs import read_meta
from sparse_export.pruning.jobs import prune
from sparse_export.pruning.recipe import Recipe

QUIET = dict(log=lambda *a: None)
SEQLEN, WINDOWS = 32, 3


def test_window_nll_matches_a_direct_sum():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, (1, 5))
    ref = 0.0
    for t in range(4):
        row = logits[0, t].astype(np.float64)
        ref += math.log(np.exp(row).sum()) - row[ids[0, t + 1]]
    assert abs(window_nll(logits, ids) - ref) < 1e-4


def test_fp32_graph_gives_torch_perplexity(tiny_dirs, text_file, tmp_path):
    deploy = tmp_path / "fp32"
    export_onnx(tiny_dirs["llama"], deploy, logits="all", **QUIET)
    got = graph_perplexity(deploy, str(text_file), SEQLEN, WINDOWS, progress=False)
    ref = evaluate(tiny_dirs["llama"], str(text_file), SEQLEN, WINDOWS)
    assert got["windows"] == ref["windows"] == WINDOWS and got["tokens"] == ref["tokens"]
    assert abs(got["perplexity"] / ref["perplexity"] - 1) < 1e-4


def test_int8_graph_gives_the_fake_quantized_perplexity(tiny_dirs, text_file, tmp_path):
    folder = tmp_path / "pruned"
    prune(tiny_dirs["llama"], folder, Recipe(calib=str(text_file), nsamples=4, seqlen=64, wbits=8, smooth=0.5),
          **QUIET)
    deploy = tmp_path / "int8"
    export_int8(folder, deploy, calib=str(text_file), nsamples=4, seqlen=64, logits="all", **QUIET)
    got = graph_perplexity(deploy, str(text_file), SEQLEN, WINDOWS, progress=False)
    model, tok = models.load_model(folder)
    qp, attn = read_qparams(read_meta(deploy))
    with torch.no_grad(), fake_int8(model, qp, attn):
        ref = evaluate(folder, str(text_file), SEQLEN, WINDOWS, model=model, tokenizer=tok)
    fp32 = evaluate(folder, str(text_file), SEQLEN, WINDOWS)
    assert abs(got["perplexity"] / ref["perplexity"] - 1) < 1e-3
    assert got["perplexity"] != fp32["perplexity"]          # the graph is not the fp32 model


def test_refuses_a_last_token_graph(tiny_dirs, text_file, tmp_path):
    deploy = tmp_path / "last"
    export_onnx(tiny_dirs["llama"], deploy, logits="last", **QUIET)
    with pytest.raises(UserError, match="logits=all"):
        graph_perplexity(deploy, str(text_file), SEQLEN, WINDOWS, progress=False)
    with pytest.raises(UserError):
        graph_perplexity(tiny_dirs["llama"], str(text_file), SEQLEN, WINDOWS, progress=False)
