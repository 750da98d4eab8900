"""Joint SparseGPT + int8 quantization: the grid, the zeros, the error compensation, and the
prune-then-round baseline."""

import pytest
import torch

from sparse_export import models
from sparse_export.cli.main import main
from sparse_export.pruning.jobs import prune
from sparse_export.outputs import read_meta
from sparse_export.pruning.driver import prune_group
from sparse_export.pruning.grid import QUANT_HEADROOM, make_quantizer
from sparse_export.pruning.recipe import Recipe
from sparse_export.errors import UserError
from sparse_export.pruning.grid import grid_tolerance, int_weight, round_weights
from sparse_export.pruning.jobs import round_pruned_folder
from sparse_export.pruning.pruners import sparsegpt


def correlated_inputs(cols, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(cols // 4, cols, generator=g)
    X = torch.randn(tokens, cols // 4, generator=g) @ basis + 0.2 * torch.randn(tokens, cols, generator=g)
    return X * (torch.rand(cols, generator=g) * 2 + 0.1)


def on_grid(W, scale, bits=8):
    """W is exactly k * scale (per row) with integer k in the signed range."""
    scale = torch.as_tensor(scale, dtype=torch.float32).reshape(-1, 1)
    k = torch.round(W / scale)
    return (torch.equal(k * scale, W) and int(k.min()) >= -2 ** (bits - 1)
            and int(k.max()) <= 2 ** (bits - 1) - 1)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(sparsity=0.0), dict(n=2, m=4)])
def test_joint_sweep_lands_exactly_on_the_int8_grid(per_channel, kw):
    X = correlated_inputs(64)
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(24, 64)
    q, scale = make_quantizer(W, 8, per_channel)
    new, mask, _ = sparsegpt(W, H, blocksize=16, quantizer=q, **kw)
    assert on_grid(new, scale)
    assert torch.all(new[mask] == 0)
    assert int((new == 0).sum()) >= int(mask.sum())
    if not per_channel:
        assert len(set(scale.tolist())) == 1


def test_per_tensor_scale_is_per_matrix_in_a_shared_sweep():
    """q/k/v share one sweep; each keeps its own per-tensor scale (was the max over the group)."""
    X = correlated_inputs(32)
    H = 2 * X.T @ X / X.shape[0]
    parts = [torch.randn(8, 32), 5 * torch.randn(4, 32), 0.1 * torch.randn(4, 32)]
    recipe = Recipe(sparsity=0.5, blocksize=16, wbits=8, per_channel=False)
    new, _, _, scales = prune_group(H, parts, recipe)
    for w, n, s in zip(parts, new, scales):
        assert torch.allclose(s, w.abs().max().expand(w.shape[0]) * QUANT_HEADROOM / 127)
        assert on_grid(n, s)


def reconstruction_errors(bits, per_channel, sparsity=0.5, seed=0):
    """||XW^T - XW'^T|| of joint SparseGPT+rounding, of prune-then-round, and of pruning alone.

    Heavy-tailed weights (as in trained LLMs: a few large values set each row's grid) and strongly
    correlated inputs. Here the error the joint sweep adds to pruning's is 30-70% of what rounding
    afterwards adds. (With light-tailed random weights at 8 bits the gap drowns in mask noise:
    the rounding errors the sweep propagates change which weights later blocks prune.)
    """
    X = correlated_inputs(128, tokens=4096, seed=seed)
    H = 2 * X.T @ X / X.shape[0]
    torch.manual_seed(100 + seed)
    W = torch.distributions.StudentT(2.0).sample((64, 128))
    q, _ = make_quantizer(W, bits, per_channel)
    joint, _, _ = sparsegpt(W, H, sparsity=sparsity, blocksize=32, quantizer=q)
    pruned, mask, _ = sparsegpt(W, H, sparsity=sparsity, blocksize=32)
    q2, _ = make_quantizer(pruned, bits, per_channel)        # the same grid, set after pruning
    rounded = q2(pruned.t(), None).t()
    assert torch.all(rounded[mask] == 0)

    def err(Wn):
        return float(torch.linalg.norm(X @ W.T - X @ Wn.T))

    return err(joint), err(rounded), err(pruned)


@pytest.mark.parametrize("bits,per_channel,seed", [(8, True, 0), (8, True, 1), (8, False, 2),
                                                   (4, True, 3), (4, True, 4)])
def test_joint_beats_prune_then_round(bits, per_channel, seed):
    joint, rounded, pruned = reconstruction_errors(bits, per_channel, seed=seed)
    assert joint < rounded
    assert joint - pruned < 0.8 * (rounded - pruned)


@pytest.fixture(scope="module")
def joint_dir(tiny_dirs, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "llama-joint"
    prune(tiny_dirs["llama"], out, Recipe(calib=str(text_file), nsamples=4, seqlen=64, wbits=8),
          log=lambda *a: None)
    return out


def test_pruned_folder_records_the_grid_and_is_exact(joint_dir):
    meta = read_meta(joint_dir)
    assert meta["quantization"]["bits"] == 8 and meta["quantization"]["zero_point"] == 0
    model, _ = models.load_model(joint_dir)
    names = models.prunable_names(model)
    assert set(names) <= set(meta["matrices"])
    for name in names:
        W = models.weight_2d(model.get_submodule(name))
        scale = meta["matrices"][name]["scale"]
        assert len(scale) == W.shape[0]
        assert on_grid(W, scale), name
        assert float((W == 0).float().mean()) >= 0.5
        int_weight(W, scale)                                  # the exporter's check passes


def test_cli_per_tensor_two_layers(tiny_dirs, text_file, tmp_path):
    out = tmp_path / "pt"
    rc = main(["prune", str(tiny_dirs["opt"]), "--out", str(out), "--calib", str(text_file),
               "--nsamples", "4", "--seqlen", "32", "--wbits", "8", "--per-tensor"])
    assert rc == 0
    meta = read_meta(out)
    model, _ = models.load_model(out)
    for name in models.prunable_names(model):
        scale = meta["matrices"][name]["scale"]
        assert len(set(scale)) == 1
        assert on_grid(models.weight_2d(model.get_submodule(name)), scale)


def test_prune_then_round_folder(tiny_dirs, text_file, tmp_path):
    pruned = tmp_path / "p"
    prune(tiny_dirs["llama"], pruned, Recipe(calib=str(text_file), nsamples=4, seqlen=64),
          log=lambda *a: None)
    out = tmp_path / "r"
    round_pruned_folder(pruned, out, log=lambda *a: None)
    before, _ = models.load_model(pruned)
    after, _ = models.load_model(out)
    meta = read_meta(out)
    assert meta["quantization"]["method"] == "round-after-pruning"
    for name in models.prunable_names(after):
        w0 = models.weight_2d(before.get_submodule(name))
        w1 = models.weight_2d(after.get_submodule(name))
        assert on_grid(w1, meta["matrices"][name]["scale"])
        assert torch.all(w1[w0 == 0] == 0)
        assert 0 < float((w1 - w0).abs().max()) <= max(meta["matrices"][name]["scale"]) / 2 + 1e-6


def test_round_weights_is_idempotent():
    from tests.tiny import tiny_model

    model = tiny_model("llama")
    s1 = round_weights(model)
    w1 = {n: models.weight_2d(model.get_submodule(n)).clone() for n in s1}
    s2 = round_weights(model)
    assert s1 == s2
    assert all(torch.equal(w1[n], models.weight_2d(model.get_submodule(n))) for n in s1)


def test_off_grid_weights_are_refused():
    from sparse_export.errors import UserError

    W = torch.randn(4, 16)
    q, scale = make_quantizer(W, 8, True)
    on = q(W.t(), None).t()
    assert torch.equal(int_weight(on, scale).float() * scale[:, None], on)
    with pytest.raises(UserError, match="m.w are not on their recorded 8-bit grid"):
        int_weight(on + 0.3 * scale[:, None], scale, name="m.w")


def test_grid_leaves_room_for_the_updates():
    """At 8 bits the scales span QUANT_HEADROOM x the row maxima, so weights the OBS updates grow are
    clipped at the grid's end far less often, and the layer's output error drops."""
    X = correlated_inputs(64)
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(64, 64)
    got = {}
    for headroom in (1.0, None):
        quantize, scale = make_quantizer(W, 8, True, headroom=headroom)
        new, _, _ = sparsegpt(W, H, sparsity=0.5, blocksize=16, quantizer=quantize)
        err = ((X @ (new - W).T) ** 2).sum()
        got[headroom] = (scale, int((torch.round(new / scale[:, None]).abs() >= 127).sum()), float(err))
    assert torch.allclose(got[None][0], W.abs().amax(dim=1) * QUANT_HEADROOM / 127)
    assert got[1.0][1] > 0  # without headroom the updates do push weights to the grid's end
    assert got[None][1] < got[1.0][1] / 2
    assert got[None][2] < got[1.0][2]


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_int_weight_reads_16bit_storage_back(stored):
    # a --wbits 8 prune of a bf16/fp16 model saves q * scale in 16 bits; the export must get q back exactly
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (64, 256), generator=g).float()
    scale = torch.rand(64, generator=g) * 0.02 + 1e-3
    W = (q * scale[:, None]).to(stored).float()
    off = float((W / scale[:, None] - q).abs().max())
    if stored == torch.bfloat16:
        assert off > 0.3          # past the old 16-bit tolerance: the 1.1B-shape run failed on this
    assert off < grid_tolerance(stored)
    assert torch.equal(int_weight(W, scale.tolist(), tol=grid_tolerance(stored)).float(), q)
    with pytest.raises(UserError):                       # fp32 storage keeps the strict check
        int_weight(W, scale.tolist(), tol=grid_tolerance(torch.float32))
