"""prune-and-export's options: one typed object per target, defaults in one place, refusals of options
a target does not use, and every recipe field reachable from both `prune` and `prune-and-export`."""

from dataclasses import fields

import pytest
import typer

from sparse_export.cli.main import main
from sparse_export.cli.app import app
from sparse_export.errors import UserError
from sparse_export.pruning.recipe import Recipe
from sparse_export.targets.options import RECIPE_FIELDS, CpuOptions, GpuOptions, build_options


def test_defaults_live_in_the_dataclasses():
    cpu, gpu = build_options("cpu"), build_options("gpu")
    assert isinstance(cpu, CpuOptions) and cpu.recipe == Recipe() and cpu.iterations == 20 and cpu.generate
    assert isinstance(gpu, GpuOptions) and gpu.recipe.pattern == "2:4" and gpu.bench_seqlen == 512


def test_given_options_land_in_the_object():
    o = build_options("cpu", sparsity=0.7, blocksize=64, ignore=["mlp"], warmup=0, logits="all", int8=True)
    assert (o.recipe.sparsity, o.recipe.blocksize, o.recipe.ignore, o.warmup, o.logits) == (0.7, 64, ["mlp"], 0, "all")
    assert o.recipe.wbits == 8  # --int8 prunes onto the int8 grid
    g = build_options("gpu", method="wanda", seed=3, warmup=1, iterations=2)
    assert (g.recipe.method, g.recipe.seed, g.warmup, g.iterations) == ("wanda", 3, 1, 2)


@pytest.mark.parametrize("given,words", [
    (dict(sparsity=0.5), "--sparsity applies to the cpu target only"),
    (dict(int8=True), "--int8 is for the cpu target"),
    (dict(runtimes=["onnxruntime"]), "--runtime applies to the cpu target only"),
    (dict(generate=False), "--generate applies to the cpu target only"),
    (dict(logits="all"), "--logits applies to the cpu target only"),
    (dict(int8_max_error=0.003), "--int8-max-error applies to the cpu target only"),
    (dict(prompt_tokens=4), "--prompt-tokens applies to the cpu target only"),
    (dict(pattern="1:4"), "at least 2 zeros in every 4"),
])
def test_gpu_refuses_what_it_does_not_use(given, words):
    with pytest.raises(UserError, match=words):
        build_options("gpu", **given)


@pytest.mark.parametrize("given,words", [
    (dict(fp32_attention=True), "--fp32-attention applies to --int8 only"),
    (dict(int8_max_error=0.003), "--int8-max-error applies to --int8 only"),
    (dict(int8=True, int8_max_error=0), "--int8-max-error must be > 0"),
    (dict(int8=True, wbits=4), "contradicts"),
    (dict(new_tokens=1), "--new-tokens"),
    (dict(warmup=-1), "--warmup"),
    (dict(method="nope"), "unknown method"),
])
def test_cpu_refuses_bad_combinations(given, words):
    with pytest.raises(UserError, match=words):
        build_options("cpu", **given)


def test_unknown_target():
    with pytest.raises(UserError, match="unknown target"):
        build_options("tpu")


def _params(command):
    cmd = typer.main.get_command(app).commands[command]
    return {p.name for p in cmd.params}


@pytest.mark.parametrize("command", ["prune", "prune-and-export"])
def test_every_recipe_field_is_a_flag(command):
    assert set(RECIPE_FIELDS) == {f.name for f in fields(Recipe)}
    assert set(RECIPE_FIELDS) <= _params(command)


def test_every_target_option_is_a_flag():
    params = _params("prune-and-export")
    for cls in (CpuOptions, GpuOptions):
        for f in fields(cls):
            if f.name != "recipe":
                assert {"runtimes": "runtime"}.get(f.name, f.name) in params, f.name


RECIPE_ARGS = ["--method", "wanda", "--sparsity", "0.6", "--calib", "c4", "--nsamples", "3", "--seqlen", "33",
               "--seed", "5", "--blocksize", "64", "--dampening", "0.02", "--ignore", "mlp", "--ignore", "o_proj",
               "--per-tensor"]
EXPECTED = dict(method="wanda", sparsity=0.6, calib="c4", nsamples=3, seqlen=33, seed=5, blocksize=64,
                dampening=0.02, ignore=["mlp", "o_proj"], per_channel=False)


def test_recipe_flags_reach_prune(monkeypatch, tmp_path):
    import sparse_export.pruning.jobs as jobs

    seen = {}
    monkeypatch.setattr(jobs, "prune", lambda model, out, recipe, **kw: seen.update(recipe=recipe))
    assert main(["prune", "m", "--out", str(tmp_path / "o"), *RECIPE_ARGS]) == 0
    assert {k: getattr(seen["recipe"], k) for k in EXPECTED} == EXPECTED


def test_recipe_flags_reach_prune_and_export(monkeypatch, tmp_path):
    import sparse_export.targets as targets

    seen = {}
    monkeypatch.setattr(targets, "run_cpu_target", lambda model, out, opts, log: seen.update(opts=opts))
    assert main(["prune-and-export", "m", "--out", str(tmp_path / "o"), *RECIPE_ARGS, "--warmup", "0",
                 "--logits", "all"]) == 0
    o = seen["opts"]
    assert {k: getattr(o.recipe, k) for k in EXPECTED} == EXPECTED
    assert (o.warmup, o.logits) == (0, "all")
    assert main(["prune-and-export", "m", "--out", str(tmp_path / "o"), "--wbits", "4", "--pattern", "2:4"]) == 0
    assert (seen["opts"].recipe.wbits, seen["opts"].recipe.pattern) == (4, "2:4")


def test_cli_gpu_refusal_is_one_line(tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["prune-and-export", "m", "--target", "gpu", "--sparsity", "0.5", "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["error: --sparsity applies to the cpu target only; the gpu target prunes n:m (--pattern, "
                   "default 2:4)"]
    assert not out.exists()
