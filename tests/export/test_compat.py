"""compat.py: every folder the project writes carries tokenizer and config files in the form transformers 4
/ tokenizers 0.15 read, and transformers 5 reads them into the same tokenizer, config and logits.
(The old readers themselves run in scripts/check_consumers.sh, in their own environment.)"""

import json
import math

import pytest
import torch

from sparse_export import compat, models
from sparse_export.errors import UserError
from sparse_export.export.compressed import export_compressed
from sparse_export.export.onnx_kv import export_kv_onnx
from sparse_export.export.onnx_plain import export_onnx
from tests.tiny import TEXT, tiny_model


def quiet(*_):
    pass


def read(folder, name):
    return json.loads((folder / name).read_text())


def assert_portable(folder, original_merges=None):
    """The files in the old form: a class both generations have, "a b" merges, legacy rope keys."""
    tc, tj, cfg = read(folder, "tokenizer_config.json"), read(folder, "tokenizer.json"), read(folder, "config.json")
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast"
    merges = tj["model"]["merges"]
    assert all(isinstance(m, str) and m.count(" ") == 1 for m in merges)
    if original_merges is not None:
        assert [m.split(" ") for m in merges] == [list(p) for p in original_merges]  # same merges, same order
    if "rope_parameters" in cfg:
        assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"]
        assert "rope_scaling" in cfg


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    """(in-memory model, in-memory tokenizer, v5 merges, folder written by models.save_model_folder)."""
    root = tmp_path_factory.mktemp("compat")
    model = tiny_model("llama", len(tokenizer))
    tokenizer.save_pretrained(root / "plain-tok")
    v5_merges = read(root / "plain-tok", "tokenizer.json")["model"]["merges"]
    assert isinstance(v5_merges[0], list)  # transformers 5 writes pairs: the rewrite has something to do
    models.save_model_folder(model, tokenizer, root / "model", {"kind": "test"})
    return model, tokenizer, v5_merges, root / "model"


def test_saved_model_folder_is_portable(saved):
    _, _, merges, folder = saved
    assert_portable(folder, merges)


def test_transformers5_reads_the_same_tokens_and_logits(saved):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer, _, folder = saved
    tok = AutoTokenizer.from_pretrained(folder)
    texts = [TEXT[:2000], "the hessian keeps error small.", "<eos>two<eos> specials"]
    for t in texts:
        assert tok(t).input_ids == tokenizer(t).input_ids
        assert tok.decode(tok(t).input_ids) == tokenizer.decode(tokenizer(t).input_ids)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == (tokenizer.eos_token, tokenizer.pad_token,
                                                             tokenizer.bos_token)
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([tokenizer(TEXT[:400]).input_ids[:48]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_legacy_rope_theta_is_the_one_transformers5_uses(saved):
    """What transformers 4 reads (top-level rope_theta) gives the inverse frequencies transformers 5
    computes, recomputed here from the textbook formula."""
    from transformers import AutoModelForCausalLM

    _, _, _, folder = saved
    cfg = read(folder, "config.json")
    theta, dim = cfg["rope_theta"], cfg["hidden_size"] // cfg["num_attention_heads"]
    expected = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    inv = AutoModelForCausalLM.from_pretrained(folder).model.rotary_emb.inv_freq.double()
    assert torch.allclose(inv, expected, rtol=1e-6)


def test_scaled_rope_round_trips(tokenizer, tmp_path):
    """A non-default rope: rope_scaling holds it all, and transformers 5 reads back the same parameters
    and logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tiny_model("llama", len(tokenizer))
    model.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}
    model = type(model)(model.config).eval()
    models.save_model_folder(model, tokenizer, tmp_path / "m", {})
    cfg = read(tmp_path / "m", "config.json")
    assert cfg["rope_theta"] == 50000.0
    assert cfg["rope_scaling"] == {"rope_type": "linear", "type": "linear", "factor": 2.0, "rope_theta": 50000.0}
    back = AutoConfig.from_pretrained(tmp_path / "m").rope_parameters
    assert {k: back[k] for k in ("rope_type", "factor", "rope_theta")} == model.config.rope_parameters
    ids = torch.arange(40)[None] % len(tokenizer)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "m")(ids).logits, model(ids).logits)


def test_every_export_folder_is_portable(tiny_dirs, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    merges = read(tmp_path / "tok", "tokenizer.json")["model"]["merges"]
    src = tiny_dirs["llama"]
    export_onnx(src, tmp_path / "plain", log=quiet)
    export_kv_onnx(src, tmp_path / "kv", max_length=32, log=quiet)
    export_compressed(src, tmp_path / "ct", log=quiet)
    for name in ("plain", "kv", "ct"):
        assert_portable(tmp_path / name, merges)
    assert "quantization_config" in read(tmp_path / "ct", "config.json")


def test_rewrites_are_idempotent_and_leave_other_files(saved, tmp_path):
    import shutil

    _, _, _, folder = saved
    shutil.copytree(folder, tmp_path / "f")
    assert compat.portable_folder(tmp_path / "f") == []  # already in the old form: nothing to change
    assert compat.portable_folder(tmp_path / "nothing") == []


def test_v5_only_keys_are_translated():
    tc = compat.legacy_tokenizer_config({"tokenizer_class": "TokenizersBackend", "backend": "tokenizers",
                                         "extra_special_tokens": ["<a>", "<b>"], "is_local": True})
    assert tc == {"tokenizer_class": "PreTrainedTokenizerFast", "backend": "tokenizers",
                  "additional_special_tokens": ["<a>", "<b>"]}
    kept = {"tokenizer_class": "GPT2Tokenizer", "extra_special_tokens": {"x": "<x>"}}
    assert compat.legacy_tokenizer_config(kept) == kept  # a class both have, the dict form: unchanged
    assert compat.legacy_config({"model_type": "gpt2"}) == {"model_type": "gpt2"}
    nested = {"rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}}
    assert compat.legacy_config(nested) == nested
    d = compat.legacy_config({"rope_parameters": {"rope_type": "default", "rope_theta": 1e5}})
    assert d["rope_theta"] == 1e5 and d["rope_scaling"] is None and math.isclose(d["rope_parameters"]["rope_theta"], 1e5)


def test_a_merge_with_a_space_is_refused():
    tj = {"model": {"type": "BPE", "merges": [["a", "b"], ["c d", "e"]]}}
    with pytest.raises(UserError, match="tokenizers 0.15"):
        compat.legacy_tokenizer_json(tj)
    assert compat.legacy_tokenizer_json({"model": {"type": "WordPiece"}}) == {"model": {"type": "WordPiece"}}
