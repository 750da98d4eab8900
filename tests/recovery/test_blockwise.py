"""Block-wise reconstruction (--recover blockwise): every zero stays zero on every architecture, the
reconstruction error falls, the streamed path equals the in-memory one, an interrupted streamed run
resumed equals an uninterrupted one, bad options are one line, and the pruned model gets closer to dense."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from sparse_export import data, models
from sparse_export.layerwise import capture_first_layer_inputs, layer_out
from sparse_export.pruning.driver import prune_model
from sparse_export.pruning.jobs import prune
from sparse_export.pruning.recipe import Recipe
from sparse_export.pruning.stream import STATE_FILE, stream_prune, work_dir
from sparse_export.recovery.blockwise import BlockwiseOptions, BlockwiseRecovery, slice_kwargs
from sparse_export.pruning.grid import int_weight
from sparse_export.recovery.masks import zero_counts
from tests.pruning.test_stream import (assert_same_weights, folder_files, kill_after_layer_one, one_line_error,
                                       run_cli, save_sharded)
from tests.tiny import ARCHS, tiny_model


def quiet(*_):
    pass


def recipe(text_file, **kw):
    return Recipe(calib=str(text_file), nsamples=4, seqlen=32, **kw)


def hook(**kw):
    return BlockwiseRecovery(BlockwiseOptions(**{"epochs": 2, "lr": 1e-3, **kw}))


class Watch(BlockwiseRecovery):
    """The hook, also recording each layer's zero counts and masks as pruned and as recovered."""

    def __init__(self, options, bits=None):
        super().__init__(options, bits)
        self.seen = []

    def after(self, i, layer, mods, hidden, kwargs, device, pruned_out, out=None, stats=None):
        pruned = ({n: m.weight.detach().clone() for n, m in mods.items()}, zero_counts(mods))
        result = super().after(i, layer, mods, hidden, kwargs, device, pruned_out, out, stats)
        self.seen.append((pruned, ({n: m.weight.detach().clone() for n, m in mods.items()}, zero_counts(mods))))
        return result


@pytest.mark.parametrize("arch", ARCHS)
def test_sliced_kwargs_give_the_rows_of_the_whole_chunk(arch, tokenizer, text_file):
    """Recovery steps on a few samples of a chunk: the cut keyword arguments (masks, alibi, positions) give
    the same outputs as the rows of the whole chunk."""
    model = tiny_model(arch, len(tokenizer))
    calib = data.calibration_windows(text_file, tokenizer, 4, 32, 0)
    with torch.no_grad():
        hidden, kwargs = capture_first_layer_inputs(model, calib, 4)
        layer = models.decoder_layers(model)[0]
        whole = layer_out(layer(hidden[0], **kwargs[0]))
        for s, e in ((0, 1), (1, 3), (3, 4)):
            part = layer_out(layer(hidden[0][s:e], **slice_kwargs(kwargs[0], s, e, 4)))
            torch.testing.assert_close(part, whole[s:e], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_zero_stays_zero_and_the_error_falls(arch, tokenizer, text_file):
    calib = data.calibration_windows(text_file, tokenizer, 4, 32, 0)
    model = tiny_model(arch, len(tokenizer))
    watch = Watch(BlockwiseOptions(epochs=3, lr=1e-3))
    log = []
    prune_model(model, calib, recipe(text_file), progress=False, layer_log=log, after_layer=watch)
    assert len(watch.seen) == len(models.decoder_layers(model))
    for (w0, z0), (w1, z1) in watch.seen:
        assert z0 == z1 and sum(z0.values()) > 0
        for name in w0:
            assert torch.equal(w0[name] != 0, w1[name] != 0), name
        assert any(not torch.equal(w0[n], w1[n]) for n in w0)      # trained
    for x in log:
        rec = x["recovery"]
        assert rec["kept"] == "recovered" and rec["after"] < rec["before"], rec


@pytest.mark.parametrize("arch, bits, group", [("llama", 8, None), ("gpt2", 4, None), ("llama", 4, 32), ("gpt2", 4, 32)])
def test_wbits_trains_through_the_grid(arch, bits, group, tokenizer, text_file):
    """A --wbits prune recovered: the weights written lie on the recorded grid (same scales), kept weights
    stay non-zero and pruned ones zero, and the error still falls."""
    calib = data.calibration_windows(text_file, tokenizer, 4, 32, 0)
    model = tiny_model(arch, len(tokenizer))
    watch = Watch(BlockwiseOptions(epochs=8 if group else 3, lr=1e-3), bits=bits)
    log = []
    stats, _ = prune_model(model, calib, recipe(text_file, wbits=bits, group_size=group), progress=False, layer_log=log,
                           after_layer=watch)
    for (w0, z0), (w1, z1) in watch.seen:
        assert z0 == z1
        assert any(not torch.equal(w0[n], w1[n]) for n in w0)
    for name, s in stats.items():
        w = models.weight_2d(model.get_submodule(name))
        int_weight(w, torch.tensor(s["scale"]), bits, name=name)     # raises off the grid
    assert all(x["recovery"]["after"] < x["recovery"]["before"] for x in log)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("one_pass", [True, False])
def test_both_calibration_modes_and_targets(one_pass, tokenizer, text_file):
    """In memory, one pass and two passes (chunks of 2), both targets: zeros kept, error down; the two
    targets train towards different outputs from layer 1 on."""
    calib = data.calibration_windows(text_file, tokenizer, 4, 32, 0)
    out = {}
    for target in ("dense-chain", "local"):
        model = tiny_model("llama", len(tokenizer))
        log = []
        prune_model(model, calib, recipe(text_file), batch=2, one_pass=one_pass, progress=False, layer_log=log,
                    after_layer=hook(target=target))
        assert all(x["recovery"]["after"] < x["recovery"]["before"] for x in log)
        out[target] = _state(model)
    first = [k for k in out["local"] if ".layers.0." in k]
    later = [k for k in out["local"] if ".layers.1." in k and k.endswith("proj.weight")]
    assert all(torch.equal(out["local"][k], out["dense-chain"][k]) for k in first)   # same inputs, same target
    assert any(not torch.equal(out["local"][k], out["dense-chain"][k]) for k in later)


@pytest.mark.parametrize("target", ["dense-chain", "local"])
def test_streamed_equals_in_memory(target, tokenizer, text_file, tmp_path):
    """Same code per layer, same chunks, same seeded order, same float operations: bit-identical."""
    src = save_sharded("llama", tmp_path / "src", tokenizer, layers=2)
    r = recipe(text_file)
    mem = prune(src, tmp_path / "mem", r, stream=False, log=quiet, after_layer=hook(target=target))
    st = prune(src, tmp_path / "str", r, stream=True, log=quiet, after_layer=hook(target=target))
    assert_same_weights(tmp_path / "mem", tmp_path / "str")
    for meta in (mem, st):
        rec = meta["recovery"]
        assert rec["method"] == "blockwise" and rec["target"] == target and rec["tokens"] == 4 * 32
        assert rec["data"] == str(text_file) and len(rec["layers"]) == 2
    strip = lambda m: [{k: v for k, v in x.items() if "seconds" not in k} for x in m["recovery"]["layers"]]  # noqa: E731
    assert strip(mem) == strip(st)


def test_two_pass_spilled_to_files_equals_in_memory(tokenizer, text_file, tmp_path):
    """Two-pass calibration in chunks of 2, both chains of hidden states in files (budget 0), against the
    in-memory two-pass driver with the same chunks: bit-identical."""
    src = save_sharded("llama", tmp_path / "src", tokenizer, layers=2)
    r = recipe(text_file)
    calib = data.calibration_windows(text_file, tokenizer, 4, 32, 0)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    prune_model(model, calib, r, batch=2, progress=False, one_pass=False, after_layer=hook())
    meta = stream_prune(src, tmp_path / "s", r, one_pass=False, batch=2, activation_budget=0, progress=False,
                        log=quiet, after_layer=hook())
    assert meta["activations"] == "file" and meta["calibration_mode"] == "two-pass"
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "s").state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, got[k]), k


@pytest.mark.parametrize("budget", [None, "0"])
def test_resume_after_sigkill_is_bit_identical(budget, tokenizer, text_file, tmp_path, capsys):
    src = save_sharded("llama", tmp_path / "src", tokenizer, layers=3)
    args = ["prune", src, "--stream", "--threads", "1", "--calib", text_file, "--nsamples", "4", "--seqlen", "32",
            "--recover", "blockwise", "--recover-lr", "1e-3"]
    if budget is not None:
        args += ["--activation-budget", budget]
    code, _ = run_cli(args + ["--out", tmp_path / "whole"], capsys)
    assert code == 0
    out = tmp_path / "cut"
    kill_after_layer_one(args + ["--out", out], out)
    state = json.loads((work_dir(out) / STATE_FILE).read_text())
    assert state["done"] == 1 and state["recovery"]["dense"]
    code, _ = run_cli(args + ["--out", out, "--resume"], capsys)
    assert code == 0 and not work_dir(out).exists()
    assert folder_files(out) == folder_files(tmp_path / "whole")
    a, b = (json.loads((f / "sparse_export.json").read_text())["recovery"] for f in (out, tmp_path / "whole"))
    strip = lambda m: [{k: v for k, v in x.items() if "seconds" not in k} for x in m["layers"]]  # noqa: E731
    assert strip(a) == strip(b) and len(a["layers"]) == 3
    # a work folder of another recovery recipe is not resumed
    if budget is not None:
        return
    kill_after_layer_one(args + ["--out", tmp_path / "p"], tmp_path / "p")
    code, err = run_cli(args + ["--out", tmp_path / "p", "--resume", "--recover-epochs", "3"], capsys)
    assert one_line_error(code, err) and "different run" in err


@pytest.mark.parametrize("bad, words", [
    (["--recover", "blockwise", "--recover-epochs", "0"], "--recover-epochs"),
    (["--recover", "blockwise", "--recover-lr", "-1"], "--recover-lr"),
    (["--recover", "blockwise", "--recover-lr", "nan"], "--recover-lr"),
    (["--recover", "blockwise", "--recover-batch", "0"], "--recover-batch"),
    (["--recover", "blockwise", "--recover-target", "teacher"], "--recover-target"),
    (["--recover", "finetune"], "unknown --recover"),
    (["--recover-epochs", "3"], "--recover blockwise only"),
    (["--recover", "blockwise", "--method", "magnitude"], "magnitude"),
])
def test_bad_options_one_line_exit_2(bad, words, tiny_dirs, text_file, tmp_path, capsys):
    out = tmp_path / "o"
    code, err = run_cli(["prune", tiny_dirs["llama"], "--out", out, "--calib", text_file, "--nsamples", "2",
                         "--seqlen", "32"] + bad, capsys)
    assert code == 2 and one_line_error(code, err) and words in err, err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_records_the_recipe_and_the_errors(tiny_dirs, text_file, tmp_path, capsys):
    out = tmp_path / "o"
    code, _ = run_cli(["prune", tiny_dirs["gpt2"], "--out", out, "--calib", text_file, "--nsamples", "4",
                       "--seqlen", "32", "--seed", "3", "--recover", "blockwise", "--recover-epochs", "3",
                       "--recover-lr", "1e-3", "--recover-target", "local"], capsys)
    assert code == 0
    meta = json.loads((out / "sparse_export.json").read_text())
    rec = meta["recovery"]
    assert {k: rec[k] for k in ("method", "epochs", "lr", "target", "seed", "batch", "data", "tokens")} == {
        "method": "blockwise", "epochs": 3, "lr": 1e-3, "target": "local", "seed": 3, "batch": 2,
        "data": str(text_file), "tokens": 4 * 32}
    assert len(rec["layers"]) == 2 and all(x["after"] < x["before"] for x in rec["layers"])
    assert rec["mean_error_after"] < rec["mean_error_before"]
    assert "recipe" in meta and meta["recipe"]["seed"] == 3
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, s in meta["matrices"].items():       # the saved sparsity is the artifact's
        w = models.weight_2d(model.get_submodule(name))
        assert float((w == 0).float().mean()) == pytest.approx(s["sparsity"])


def _kl_and_nll(model, dense_logits, ids):
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    logp, logq = F.log_softmax(logits, -1), F.log_softmax(dense_logits, -1)
    kl = float((logq.exp() * (logq - logp)).sum(-1).mean())
    nll = float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))
    return kl, nll


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_recovered_model_is_closer_to_dense(arch, tokenizer, text_file):
    """KL to the dense model's next-token distribution on the calibration windows: lower after recovery;
    perplexity on them no further from dense."""
    calib = data.calibration_windows(text_file, tokenizer, 8, 32, 0)
    r = Recipe(calib=str(text_file), nsamples=8, seqlen=32, sparsity=0.7)
    dense = tiny_model(arch, len(tokenizer))
    with torch.no_grad():
        dense_logits = dense(input_ids=calib).logits
    dense_nll = _kl_and_nll(dense, dense_logits, calib)[1]
    results = {}
    for name, h in (("one-shot", None), ("recovered", hook(epochs=3))):
        model = tiny_model(arch, len(tokenizer))
        prune_model(model, calib, r, progress=False, after_layer=h)
        results[name] = _kl_and_nll(model, dense_logits, calib)
    (kl0, nll0), (kl1, nll1) = results["one-shot"], results["recovered"]
    assert kl1 < kl0
    assert abs(nll1 - dense_nll) <= abs(nll0 - dense_nll) + 1e-3


# -- prune-and-export (cpu target)

def test_prune_and_export_options():
    from sparse_export.errors import UserError
    from sparse_export.targets.options import build_options

    o = build_options("cpu", recover="blockwise", recover_epochs=3, recover_target="local")
    h = o.recovery_hook()
    assert isinstance(h, BlockwiseRecovery) and (h.options.epochs, h.options.target) == (3, "local")
    assert build_options("cpu").recovery_hook() is None
    for given, words in ((dict(recover="blockwise", recover_lr=0.0), "--recover-lr"),
                         (dict(recover_batch=4), "--recover blockwise only"),
                         (dict(recover="blockwise", method="magnitude"), "magnitude")):
        with pytest.raises(UserError, match=words):
            build_options("cpu", **given)
    assert isinstance(build_options("gpu", recover="blockwise").recovery_hook(), BlockwiseRecovery)  # both targets
    with pytest.raises(UserError, match="--recover blockwise only"):
        build_options("gpu", recover="distill", recover_epochs=2)


def test_prune_and_export_bad_value_one_line(tiny_dirs, text_file, tmp_path, capsys):
    out = tmp_path / "o"
    code, err = run_cli(["prune-and-export", tiny_dirs["llama"], "--out", out, "--calib", text_file,
                         "--recover", "blockwise", "--recover-target", "nope"], capsys)
    assert code == 2 and one_line_error(code, err) and "--recover-target" in err
    assert not out.exists()


@pytest.mark.slow
def test_prune_and_export_recovers(tiny_dirs, text_file, tmp_path):
    from tests.targets.test_cpu import _pipeline_args

    from sparse_export.cli.main import main

    out = tmp_path / "out"
    assert main(_pipeline_args(tiny_dirs, text_file, out, ["--no-generate", "--recover", "blockwise",
                                                           "--recover-lr", "1e-3"])) == 0
    rec = json.loads((out / "pruned-model" / "sparse_export.json").read_text())["recovery"]
    assert rec["method"] == "blockwise" and all(x["after"] < x["before"] for x in rec["layers"])
