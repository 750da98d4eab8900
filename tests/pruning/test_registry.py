"""What the driver does follows the pruner's registry entry (its attributes), not its name; each
architecture entry says where its layers are and how wide they are."""

import pytest
import torch

from sparse_export import archs, models
from sparse_export.pruning import pruners
from sparse_export.pruning.driver import one_pass_fits
from sparse_export.pruning.jobs import prune
from sparse_export.pruning.pruners import PRUNERS, Pruner
from sparse_export.pruning.recipe import Recipe
from tests.tiny import ARCHS, tiny_config, tiny_model


def test_a_pruner_without_calibration_needs_no_text(tiny_dirs, tmp_path, monkeypatch):
    calls = []

    def half(W, H, sparsity=0.5, **_):
        calls.append(H)
        W = W.detach().float().clone()
        W[:, : W.shape[1] // 2] = 0
        return W, W == 0, None

    monkeypatch.setitem(PRUNERS, "half", Pruner(half, "half", needs_calibration=False))
    meta = prune(tiny_dirs["llama"], tmp_path / "o", Recipe(method="half", calib="no/such/file.txt"),
                 log=lambda *_: None)
    assert meta["calibration_mode"] == "none" and calls and all(h is None for h in calls)
    assert meta["pruned_sparsity"] == pytest.approx(0.5)


def test_joint_quantization_follows_the_attribute(monkeypatch):
    with pytest.raises(Exception, match="--wbits"):
        Recipe(method="wanda", wbits=8).validate()
    monkeypatch.setitem(PRUNERS, "wanda", Pruner(pruners.wanda, "Wanda", needs_calibration=True, joint_quant=True))
    assert Recipe(method="wanda", wbits=8).validate().wbits == 8


def test_registry_entries():
    assert set(PRUNERS) == {"sparsegpt", "wanda", "magnitude", "alps"}
    assert PRUNERS["alps"].needs_calibration and PRUNERS["alps"].joint_quant and not PRUNERS["wanda"].joint_quant
    assert PRUNERS["sparsegpt"].shares_factor and PRUNERS["sparsegpt"].joint_quant
    assert not PRUNERS["magnitude"].needs_calibration and PRUNERS["wanda"].needs_calibration


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_entry_finds_its_layers_and_widths(arch):
    model = tiny_model(arch)
    entry = archs.arch_of(model)
    assert entry.model_type == arch and len(entry.decoder_layers(model)) == 2
    assert entry.hidden_size(model.config) == 64
    assert entry.inner_size(model.config) == (256 if arch == "bloom" else 128)  # bloom: 4 x hidden
    assert models.prunable_names(model)[0].startswith(entry.layers + ".0.")
    names = entry.attention_names(model)
    assert (arch in archs.STANDARD_ATTENTION) == bool(names)
    for n in names:
        assert "attn" in type(model.get_submodule(n)).__name__.lower() or "attention" in \
            type(model.get_submodule(n)).__name__.lower()


def test_unsupported_architecture_is_one_line():
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gptj", n_embd=32, n_layer=1, n_head=2,
                                                                  vocab_size=50, rotary_dim=8))
    with pytest.raises(Exception, match="unsupported architecture 'gptj'"):
        models.decoder_layers(model)


def test_one_pass_budget_uses_the_entry_widths():
    model = tiny_model("opt")
    h, inner = 64, 128
    fits = int(3 * 2**30 / ((h + inner) * 4 * 6))
    assert one_pass_fits(model, fits) and not one_pass_fits(model, fits + 1)
    assert torch.is_tensor(next(model.parameters())) and tiny_config("opt").ffn_dim == inner
