"""SmoothQuant migration (pruning/smooth.py): the fp32 function is unchanged on every supported
architecture, the scales match a hand computation (grouped-query heads included), the int8 error shrinks,
the recipe refuses a bad alpha, and a smoothed prune streams bit for bit like the in-memory one."""

import copy

import numpy as np
import pytest
import torch

from sparse_export import models
from sparse_export.errors import UserError
from sparse_export.layerwise import capture_first_layer_inputs
from sparse_export.pruning.jobs import prune
from sparse_export.pruning.recipe import Recipe
from sparse_export.pruning.smooth import smooth_layer, smooth_model, smooth_scales
from tests.pruning.test_stream import assert_same_weights, one_line_error, run_cli, save_sharded
from tests.tiny import ARCHS, tiny_config, tiny_model

QUIET = dict(log=lambda *a: None)


def ids(batch=3, seqlen=24, seed=0):
    return torch.randint(1, 300, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def plant_outliers(model, factor=60.0):
    """Make a few input channels of every layer large, as real LLMs have (the norm weights carry them)."""
    with torch.no_grad():
        for layer in models.decoder_layers(model):
            for name, mod in layer.named_modules():
                if "norm" in name or name in ("ln_1", "ln_2"):
                    mod.weight[[3, 17]] *= factor
    return model


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def variant(arch, **config):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch)
    for k, v in config.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


CASES = [(a, {}) for a in ARCHS] + [("opt", {"do_layer_norm_before": False}),
                                    ("bloom", {"apply_residual_connection_post_layernorm": True})]


@pytest.mark.parametrize("arch,config", CASES, ids=[f"{a}{'-post-norm' if c else ''}" for a, c in CASES])
def test_smoothing_keeps_the_fp32_function(arch, config):
    model = plant_outliers(variant(arch, **config))
    x = ids()
    before = copy.deepcopy(model.state_dict())
    ref = logits(model, x)
    record = smooth_model(model, ids(4, 32, seed=1), alpha=0.5)
    out = logits(model, x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    # pre-norm families fold into their norms; post-norm ones keep them and fold v_proj -> out_proj only
    producers = set(record[0])
    if config:
        assert not any("norm" in p for p in producers)
        assert producers == ({"self_attn.v_proj"} if arch == "opt" else set())
    else:
        assert any("norm" in p or p.startswith("ln_") for p in producers)
    assert bool(changed) == bool(producers)
    for lo, hi in record[0].values():
        assert 0 < lo <= hi and max(abs(lo - 1), abs(hi - 1)) > 0.01   # not all 1: something moved


def test_scales_formula_and_dead_channels():
    s = smooth_scales(torch.tensor([4.0, 0.0, 1.0, 9.0]), torch.tensor([1.0, 2.0, 0.0, 4.0]), 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 1.0, 1.0, 1.5]))
    s = smooth_scales(torch.tensor([8.0]), torch.tensor([0.5]), 0.75)
    assert torch.allclose(s, torch.tensor([8 ** 0.75 / 0.5 ** 0.25]))


def _captured_inputs(layer, names, h, kw):
    """Inputs of the named modules when `layer` runs (a plain forward hook, no reductions)."""
    got = {}

    def keep(name):
        def fn(module, args):
            got[name] = args[0].detach().reshape(-1, args[0].shape[-1]).numpy().copy()
        return fn

    handles = [layer.get_submodule(n).register_forward_pre_hook(keep(n)) for n in names]
    with torch.no_grad():
        layer(h, **kw)
    for hd in handles:
        hd.remove()
    return got


def test_llama_scales_match_a_hand_computation():
    """Grouped-query attention (4 query heads, 2 key/value heads): each v_proj channel gets one scale from
    the o_proj columns of every query head that reads it."""
    alpha = 0.6
    model = plant_outliers(tiny_model("llama"))
    hidden, kwargs = capture_first_layer_inputs(model, ids(2, 16), 2)
    layer = models.decoder_layers(model)[0]
    old = copy.deepcopy(layer)
    names = ["self_attn.q_proj", "mlp.gate_proj", "self_attn.o_proj", "mlp.down_proj"]
    X = _captured_inputs(old, names, hidden[0], kwargs[0])
    smooth_layer(layer, hidden, kwargs, alpha)

    def W(lay, n):
        return lay.get_submodule(n).weight.detach().numpy().astype(np.float64)

    def scales(x, w):
        return np.abs(x).max(0) ** alpha / np.abs(w).max(0) ** (1 - alpha)

    heads, kv, dim = 4, 2, 16
    groups = heads // kv
    # input_layernorm -> q, k, v
    s_qkv = scales(X["self_attn.q_proj"], np.concatenate([W(old, f"self_attn.{p}_proj") for p in "qkv"]))
    s_mlp = scales(X["mlp.gate_proj"], np.concatenate([W(old, "mlp.gate_proj"), W(old, "mlp.up_proj")]))
    # v_proj -> o_proj: v channel j = g * dim + d is read by o_proj columns (h * dim + d) for h // groups == g
    xo, wo = np.abs(X["self_attn.o_proj"]).max(0), np.abs(W(old, "self_attn.o_proj")).max(0)
    s_v = np.zeros(kv * dim)
    for g in range(kv):
        for d in range(dim):
            cols = [h * dim + d for h in range(heads) if h // groups == g]
            s_v[g * dim + d] = xo[cols].max() ** alpha / wo[cols].max() ** (1 - alpha)
    s_o = np.array([s_v[(c // dim) // groups * dim + c % dim] for c in range(heads * dim)])
    s_up = scales(X["mlp.down_proj"], W(old, "mlp.down_proj"))

    def close(a, b):
        assert np.allclose(a, b, rtol=2e-5, atol=1e-7)

    close(W(layer, "input_layernorm"), W(old, "input_layernorm") / s_qkv)
    close(W(layer, "post_attention_layernorm"), W(old, "post_attention_layernorm") / s_mlp)
    close(W(layer, "self_attn.q_proj"), W(old, "self_attn.q_proj") * s_qkv)
    close(W(layer, "self_attn.k_proj"), W(old, "self_attn.k_proj") * s_qkv)
    close(W(layer, "self_attn.v_proj"), W(old, "self_attn.v_proj") * s_qkv / s_v[:, None])
    close(W(layer, "self_attn.o_proj"), W(old, "self_attn.o_proj") * s_o)
    close(W(layer, "mlp.gate_proj"), W(old, "mlp.gate_proj") * s_mlp)
    close(W(layer, "mlp.up_proj"), W(old, "mlp.up_proj") * s_mlp / s_up[:, None])
    close(W(layer, "mlp.down_proj"), W(old, "mlp.down_proj") * s_up)


def test_smoothing_cuts_the_int8_error():
    """Static per-tensor uint8 inputs (the INT8 graph's arithmetic): planted outlier channels make the
    error large; smoothed, the same model's int8 logits are much closer to its fp32 logits."""
    from sparse_export.export.int8_calib import fake_int8
    from sparse_export.export.onnx_int8 import prepare_int8

    def int8_error(model):
        x, calib = ids(), ids(4, 32, seed=1)
        ref = logits(model, x)
        _, qp, attn, _, _ = prepare_int8(model, {}, calib, outlier_ratio=None)
        with fake_int8(model, qp, attn):
            return float((logits(model, x) - ref).abs().max() / ref.abs().max())

    plain = int8_error(plant_outliers(tiny_model("llama")))
    model = plant_outliers(tiny_model("llama"))
    smooth_model(model, ids(4, 32, seed=1), alpha=0.5)
    assert int8_error(model) < 0.5 * plain


@pytest.mark.parametrize("alpha", [0.0, -0.5, 1.5, float("nan")])
def test_recipe_refuses_a_bad_alpha(alpha):
    with pytest.raises(UserError, match="--smooth"):
        Recipe(smooth=alpha).validate()


def test_smooth_needs_calibration_and_cli_errors_are_one_line(tmp_path, capsys, tiny_dirs, text_file):
    with pytest.raises(UserError, match="--smooth"):
        Recipe(method="magnitude", smooth=0.5).validate()
    code, err = run_cli(["prune", tiny_dirs["llama"], "--out", tmp_path / "o", "--smooth", "1.5",
                         "--calib", text_file], capsys)
    assert one_line_error(code, err) and "--smooth" in err
    code, err = run_cli(["prune-and-export", tiny_dirs["llama"], "--out", tmp_path / "p", "--smooth", "0",
                         "--calib", text_file], capsys)
    assert one_line_error(code, err) and "--smooth" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "p").exists()


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_smoothed_prune_streams_like_in_memory(arch, tokenizer, text_file, tmp_path):
    src = save_sharded(arch, tmp_path / "src", tokenizer)
    r = Recipe(calib=str(text_file), nsamples=4, seqlen=32, smooth=0.5, wbits=8)
    meta = prune(src, tmp_path / "mem", r, stream=False, **QUIET)
    prune(src, tmp_path / "str", r, stream=True, **QUIET)
    assert_same_weights(tmp_path / "mem", tmp_path / "str")
    assert meta["recipe"]["smooth"] == 0.5
    assert all(layer["smooth_scales"] for layer in meta["layers"])
    assert abs(meta["pruned_sparsity"] - 0.5) < 0.01
    # the norms were rescaled and saved; without --smooth they are not touched
    plain = prune(src, tmp_path / "plain", Recipe(calib=str(text_file), nsamples=4, seqlen=32, wbits=8), **QUIET)
    assert "smooth_scales" not in plain["layers"][0]
    a, b = models.load_model(tmp_path / "mem")[0], models.load_model(tmp_path / "plain")[0]
    norm = "input_layernorm" if arch == "llama" else "self_attn_layer_norm"
    wa = models.decoder_layers(a)[0].get_submodule(norm).weight
    wb = models.decoder_layers(b)[0].get_submodule(norm).weight
    assert not torch.allclose(wa, wb)


def test_smoothed_joint_prune_stays_on_its_grid_and_keeps_outlier_rows(tokenizer, text_file, tmp_path):
    """v_proj / up_proj rows are rescaled after they are pruned: their weights sit exactly on the recorded
    per-row grid, and a row carrying an outlier channel keeps its share of the weights (pruned in the row's
    own scale, SparseGPT's one-mask-per-matrix choice would otherwise give the whole row away)."""
    src = tmp_path / "src"
    model = tiny_model("llama", len(tokenizer))
    with torch.no_grad():
        for layer in models.decoder_layers(model):
            layer.mlp.gate_proj.weight[[5, 40]] *= 30.0        # outlier channels of the down_proj input
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    meta = prune(src, tmp_path / "out", Recipe(calib=str(text_file), nsamples=4, seqlen=64, smooth=0.9, wbits=8),
                 **QUIET)
    pruned, _ = models.load_model(tmp_path / "out")
    for name, entry in meta["matrices"].items():
        w = models.weight_2d(pruned.get_submodule(name)).float()
        q = w / torch.tensor(entry["scale"]).reshape(-1, 1)
        assert (q - q.round()).abs().max() < 1e-3, name
    for i, layer in enumerate(models.decoder_layers(pruned)):
        kept = (layer.mlp.up_proj.weight[[5, 40]] != 0).float().mean(1)
        assert kept.min() > 0.25, (i, kept)
