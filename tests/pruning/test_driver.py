"""The sequential driver, the saved folder and the `prune` / `eval` commands on tiny models."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparse_export import data, models
from sparse_export.cli.main import main
from sparse_export.pruning.jobs import prune
from sparse_export.pruning.driver import prune_model
from sparse_export.pruning.recipe import Recipe
from tests.tiny import ARCHS, tiny_model


def quiet(*_):
    pass


def recipe(text_file, **kw):
    return Recipe(calib=str(text_file), nsamples=4, seqlen=32, **kw)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_each_architecture_prunes_and_reloads(arch, pattern, tiny_dirs, text_file, tmp_path):
    out = tmp_path / "pruned"
    meta = prune(tiny_dirs[arch], out, recipe(text_file, pattern=pattern), log=quiet)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    names = models.prunable_names(model)
    assert names and set(names) == set(meta["matrices"])
    for name in names:
        w = models.weight_2d(model.get_submodule(name))
        zeros = float((w == 0).float().mean())
        assert zeros == pytest.approx(meta["matrices"][name]["sparsity"])
        assert zeros >= 0.5
        if pattern:
            assert torch.all((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2)
    # embeddings and LM head stay dense
    assert float((model.get_input_embeddings().weight == 0).float().mean()) < 0.01
    saved = json.loads((out / "sparse_export.json").read_text())
    for key in ("recipe", "matrices", "timing", "peak_memory_gib", "versions"):
        assert key in saved
    assert saved["recipe"]["pattern"] == pattern
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_ignore_leaves_modules_dense(tiny_dirs, text_file, tmp_path):
    meta = prune(tiny_dirs["llama"], tmp_path / "p", recipe(text_file, ignore=[r"mlp\.down_proj"]), log=quiet)
    assert meta["matrices"] and not any("down_proj" in n for n in meta["matrices"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    w = model.model.layers[0].mlp.down_proj.weight
    assert float((w == 0).float().mean()) < 0.01


def test_same_seed_same_masks_other_seed_other_masks(tiny_dirs, text_file, tmp_path):
    a = prune(tiny_dirs["llama"], tmp_path / "a", recipe(text_file, seed=1), log=quiet)
    b = prune(tiny_dirs["llama"], tmp_path / "b", recipe(text_file, seed=1), log=quiet)
    c = prune(tiny_dirs["llama"], tmp_path / "c", recipe(text_file, seed=2), log=quiet)
    wa, wb, wc = (AutoModelForCausalLM.from_pretrained(tmp_path / x).state_dict() for x in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert a["matrices"].keys() == b["matrices"].keys() == c["matrices"].keys()


def test_two_pass_is_chunking_invariant(tokenizer, text_file):
    """Two-pass mode: Hessians summed over chunks of 1 or of all samples give the same model."""
    calib = data.calibration_windows(text_file, tokenizer, 4, 32, 0)
    outs = []
    for batch in (1, 4):
        model = tiny_model("llama", len(tokenizer))
        prune_model(model, calib, recipe(text_file), batch=batch, progress=False, one_pass=False)
        outs.append(model.state_dict())
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=1e-4, atol=1e-5)


def test_one_pass_prunes_from_pruned_upstream(tokenizer, text_file):
    """One pass and two passes agree on the first module of a layer (same inputs) and differ after."""
    calib = data.calibration_windows(text_file, tokenizer, 4, 32, 0)
    res = {}
    for one_pass in (True, False):
        model = tiny_model("llama", len(tokenizer))
        prune_model(model, calib, recipe(text_file), progress=False, one_pass=one_pass)
        res[one_pass] = model
    l1, l2 = res[True].model.layers[0], res[False].model.layers[0]
    torch.testing.assert_close(l1.self_attn.q_proj.weight, l2.self_attn.q_proj.weight)
    assert not torch.equal(l1.mlp.down_proj.weight, l2.mlp.down_proj.weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype, tokenizer, text_file):
    calib = data.calibration_windows(text_file, tokenizer, 4, 32, 0)
    model = tiny_model("llama", len(tokenizer)).to(dtype)
    stats, _ = prune_model(model, calib, recipe(text_file), progress=False)
    w = model.model.layers[1].mlp.up_proj.weight
    assert w.dtype == dtype
    assert float((w == 0).float().mean()) == pytest.approx(0.5)
    assert all(s["sparsity"] == pytest.approx(0.5) for s in stats.values())


def test_self_generated_calibration_is_seeded(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    a = data.calibration_windows("self", tokenizer, 3, 16, seed=5, model=model)
    b = data.calibration_windows("self", tokenizer, 3, 16, seed=5, model=model)
    assert a.shape == (3, 16) and torch.equal(a, b)


def test_calibration_windows_are_distinct_slices(tokenizer, text_file):
    ids = data.tokenize_stream(data.read_texts(text_file), tokenizer)
    w = data.calibration_windows(text_file, tokenizer, 8, 32, seed=0)
    starts = set()
    for row in w:
        hits = [s for s in range(ids.numel() - 31) if torch.equal(ids[s:s + 32], row)]
        assert hits
        starts.add(hits[0])
    assert len(starts) == 8


def test_jsonl_and_eval_windows(tokenizer, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"doc {i} the model prunes weights"}) for i in range(50)))
    texts = data.read_texts(p)
    assert len(texts) == 50 and texts[3].startswith("doc 3")
    w = data.eval_windows(p, tokenizer, 16, max_segments=3)
    assert w.shape == (3, 16)


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def one_line_error(code, err):
    lines = [x for x in err.strip().splitlines() if x.strip()]
    return code != 0 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err


@pytest.mark.parametrize("extra,expect", [
    (["--sparsity", "1.0"], "sparsity"),
    (["--sparsity", "-0.1"], "sparsity"),
    (["--pattern", "3:2"], "pattern"),
    (["--pattern", "2-4"], "pattern"),
    (["--pattern", "0:4"], "pattern"),
    (["--method", "obs"], "method"),
])
def test_cli_rejects_bad_recipes(extra, expect, tiny_dirs, text_file, tmp_path, capsys):
    out = tmp_path / "o"
    code, err = run_cli(["prune", tiny_dirs["llama"], "--out", out, "--calib", text_file] + extra, capsys)
    assert one_line_error(code, err) and expect in err
    assert not out.exists() and not list(tmp_path.glob(".o.tmp*"))


def test_cli_bad_paths(tiny_dirs, text_file, tmp_path, capsys):
    code, err = run_cli(["prune", tmp_path / "nope", "--out", tmp_path / "o"], capsys)
    assert one_line_error(code, err) and "not found" in err
    code, err = run_cli(["prune", tiny_dirs["llama"], "--out", tmp_path / "o", "--calib", tmp_path / "x.txt"], capsys)
    assert one_line_error(code, err) and "not found" in err
    (tmp_path / "empty").mkdir()
    code, err = run_cli(["prune", tmp_path / "empty", "--out", tmp_path / "o"], capsys)
    assert one_line_error(code, err) and "not a model folder" in err
    code, err = run_cli(["eval", tmp_path / "nope.gguf"], capsys)
    assert one_line_error(code, err)
    assert not (tmp_path / "o").exists()


def test_cli_short_calibration_text(tiny_dirs, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    code, err = run_cli(["prune", tiny_dirs["llama"], "--out", tmp_path / "o", "--calib", short,
                         "--seqlen", "512"], capsys)
    assert one_line_error(code, err) and "fewer than one window" in err
    assert not (tmp_path / "o").exists()


def test_cli_unsupported_architecture(tokenizer, text_file, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM as Auto

    cfg = AutoConfig.for_model("gptj", vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2,
                               rotary_dim=8)
    folder = tmp_path / "gptj"
    Auto.from_config(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    code, err = run_cli(["prune", folder, "--out", tmp_path / "o", "--calib", text_file], capsys)
    assert one_line_error(code, err) and "unsupported architecture 'gptj'" in err and "llama" in err


def test_cli_existing_out_needs_force(tiny_dirs, text_file, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["prune", tiny_dirs["llama"], "--out", out, "--calib", text_file, "--nsamples", "2",
            "--seqlen", "32"]
    code, err = run_cli(args, capsys)
    assert one_line_error(code, err) and "--force" in err and (out / "keep.txt").exists()
    code, err = run_cli(args + ["--force"], capsys)
    assert code == 0 and not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_cli_interrupt_leaves_nothing(tiny_dirs, text_file, tmp_path, capsys, monkeypatch):
    import sparse_export.pruning.jobs as jobs

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "prune_model", boom)
    code, err = run_cli(["prune", tiny_dirs["llama"], "--out", tmp_path / "o", "--calib", text_file,
                         "--nsamples", "2", "--seqlen", "32"], capsys)
    assert code == 130 and one_line_error(code, err)
    assert list(tmp_path.iterdir()) == []


def test_cli_prune_then_eval(tiny_dirs, text_file, tmp_path, capsys):
    out = tmp_path / "o"
    code, _ = run_cli(["prune", tiny_dirs["gpt2"], "--out", out, "--calib", text_file, "--nsamples", "4",
                       "--seqlen", "32", "--pattern", "2:4"], capsys)
    assert code == 0
    code = main(["eval", str(out), "--data", str(text_file), "--seqlen", "32", "--max-segments", "4",
                 "--json", str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and res["windows"] == 4 and res["perplexity"] > 1
    assert f"{res['perplexity']:.4g}" in printed


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_by_layer_forward_equals_model_forward(arch, tokenizer):
    """The captured inputs and keyword arguments reproduce the model's own forward exactly,
    so Hessians are built from the activations the model really computes (causal masks included)."""
    from sparse_export.layerwise import capture_first_layer_inputs, layer_out

    model = tiny_model(arch, len(tokenizer))
    ids = torch.randint(0, len(tokenizer), (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden, kwargs = capture_first_layer_inputs(model, ids, 3)
        h = hidden[0]
        for layer in models.decoder_layers(model):
            h = layer_out(layer(h, **kwargs[0]))
        seen = {}
        last = models.decoder_layers(model)[-1]
        handle = last.register_forward_hook(lambda m, a, o: seen.update(out=layer_out(o)))
        model(input_ids=ids, use_cache=False)
        handle.remove()
    torch.testing.assert_close(h, seen["out"])
    # and causality holds: changing the last token leaves earlier positions alone
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % len(tokenizer)
    with torch.no_grad():
        hidden2, kwargs2 = capture_first_layer_inputs(model, ids2, 3)
        h2 = hidden2[0]
        for layer in models.decoder_layers(model):
            h2 = layer_out(layer(h2, **kwargs2[0]))
    torch.testing.assert_close(h[:, :-1], h2[:, :-1])
