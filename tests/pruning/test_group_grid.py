"""Group-wise grids (--wbits 4 --group-size G) in the joint SparseGPT sweep, against a naive reference."""

import pytest
import torch

from sparse_export import models
from sparse_export.cli.main import main
from sparse_export.errors import UserError
from sparse_export.outputs import read_meta
from sparse_export.pruning.grid import GroupQuantizer, check_int8_grid, int_weight, recorded_scales
from sparse_export.pruning.jobs import prune
from sparse_export.pruning.pruners import sparsegpt
from sparse_export.pruning.recipe import Recipe


def naive_joint(W, H, sparsity, blocksize, group, bits=4, damp=0.01, keep_nonzero=False, fixed_mask=None):
    """SparseGPT with a group-wise grid written plainly in float64: the inverse Hessian's upper Cholesky
    factor from torch.linalg (no lazy batches), every column's error applied to all later columns at once,
    a block's mask from the lowest fraction of (w / U_jj)^2 over the block, a group's scales from max |w| of
    its columns when the sweep reaches its first one (float16 values), kept weights rounded to nearest (with
    keep_nonzero: +-1 where that is 0), pruned ones 0."""
    W = W.double().clone()
    rows, cols = W.shape
    Hd = H.double() + damp * H.diag().mean() * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    qmax = 2 ** (bits - 1) - 1
    scales = torch.zeros(rows, cols // group, dtype=torch.float64)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        score = (W[:, i1:i2] / U.diag()[i1:i2]) ** 2
        k = int(score.numel() * sparsity)
        block = torch.zeros(score.numel(), dtype=torch.bool)
        block[score.reshape(-1).argsort()[:k]] = True
        mask[:, i1:i2] = block.view(score.shape) if fixed_mask is None else fixed_mask[:, i1:i2]
        for j in range(i1, i2):
            if j % group == 0:
                s = W[:, j:j + group].abs().amax(dim=1) / qmax
                scales[:, j // group] = s.clamp_min(2.0 ** -24).half().double()
            s = scales[:, j // group]
            q = torch.clamp(torch.round(W[:, j] / s), -qmax - 1, qmax)
            q = (torch.where(q == 0, torch.sign(W[:, j]), q) if keep_nonzero else q) * s
            q[mask[:, j]] = 0
            err = (W[:, j] - q) / U[j, j]
            W[:, j:] -= torch.outer(err, U[j, j:])
            W[:, j] = q
    return W, mask, scales


@pytest.mark.parametrize("keep_nonzero", [False, True])
@pytest.mark.parametrize("group,blocksize,sparsity", [(32, 64, 0.5), (64, 128, 0.5), (128, 128, 0.7),
                                                      (256, 128, 0.5), (64, 128, 0.0)])
def test_group_joint_pruning_matches_the_naive_reference(group, blocksize, sparsity, keep_nonzero):
    torch.manual_seed(group + blocksize)
    rows, cols = 24, 256
    W = torch.randn(rows, cols)
    X = torch.randn(4 * cols, cols) * torch.rand(cols) * 2
    H = X.t() @ X / X.shape[0]
    quant = GroupQuantizer(rows, cols, 4, group, keep_nonzero=keep_nonzero)
    Wn, mask, _ = sparsegpt(W, H, sparsity, blocksize=blocksize, quantizer=quant)
    ref, ref_mask, ref_scale = naive_joint(W, H, sparsity, blocksize, group, keep_nonzero=keep_nonzero)
    # the properties, exactly: every weight an integer in [-8, 7] of its group's scale, pruned weights 0
    q = Wn / quant.scale.repeat_interleave(group, dim=1)
    assert torch.equal(q, torch.round(q)) and q.min() >= -8 and q.max() <= 7
    assert bool((Wn[mask] == 0).all())                    # zeros stay zero: no pruned weight comes back
    assert float(mask.float().mean()) == pytest.approx(sparsity, abs=0.01)
    if keep_nonzero:
        assert torch.equal(Wn == 0, mask)                 # the pruner's mask is exactly the artifact's
    else:                                                 # only kept weights under half a step became 0
        assert float(((Wn == 0) & ~mask).float().mean()) < 0.25
    assert torch.equal(quant.scale.half().float(), quant.scale)   # float16 values
    # against the reference: the same mask, scales and integers (float32 vs float64 sweeps may round a rare
    # weight the other way near a half step)
    assert (mask == ref_mask).float().mean() >= 0.995
    close = torch.isclose(quant.scale.double(), ref_scale, rtol=2e-3)
    assert close.float().mean() >= 0.95 and torch.allclose(quant.scale.double(), ref_scale, rtol=0.05)
    ref_q = ref / ref_scale.repeat_interleave(group, dim=1)
    assert (torch.round(ref_q) == q.double()).float().mean() >= 0.98
    assert ((ref == 0) == (Wn == 0)).float().mean() >= 0.99
    assert ((Wn.double() - ref).abs() <= 0.02 * float(ref.abs().max())).float().mean() >= 0.99


def test_group_scales_follow_the_updated_weights():
    """A group's scales come from its weights as the sweep reaches it (already updated), not from W before the
    sweep: a scale fixed from the original weights differs."""
    torch.manual_seed(3)
    W, X = torch.randn(8, 128), torch.randn(400, 128)
    H = X.t() @ X
    quant = GroupQuantizer(8, 128, 4, 32)
    sparsegpt(W, H, 0.5, blocksize=128, quantizer=quant)
    before = (W[:, 32:64].abs().amax(dim=1) / 7).half().float()
    assert not torch.equal(quant.scale[:, 1], before)
    assert torch.equal(quant.scale[:, 0], (W[:, :32].abs().amax(dim=1) / 7).half().float())  # nothing before it


@pytest.mark.parametrize("kw,expect", [
    (dict(group_size=128), "--wbits"),
    (dict(wbits=4, group_size=48), "power of two"),
    (dict(wbits=4, group_size=16), "power of two"),
    (dict(wbits=4, group_size=64, per_channel=False), "--per-tensor"),
    (dict(wbits=4, group_size=64, blocksize=96), "--blocksize"),
    (dict(wbits=4, group_size=64, smooth=0.5), "--smooth"),
    (dict(wbits=4, clip_search=True), "--group-size"),
])
def test_recipe_refuses_bad_groups(kw, expect):
    with pytest.raises(UserError, match=expect):
        Recipe(**kw).validate()
    Recipe(wbits=4, group_size=256).validate()      # a group wider than the block: fine


def _problem(seed, rows=24, cols=256, mixed=False):
    """A weight and a Hessian; mixed: correlated inputs, as real layers have (what error moving exploits)."""
    torch.manual_seed(seed)
    W = torch.randn(rows, cols)
    X = torch.randn(4 * cols, cols)
    if mixed:
        X = X @ (torch.eye(cols) + torch.randn(cols, cols) / cols ** 0.5)
    X = X * torch.rand(cols) * 2
    return W, X.t() @ X / X.shape[0]


def _on_grid(Wn, quant):
    q = Wn / quant.scale.repeat_interleave(quant.group_size, dim=1)
    return torch.equal(q, torch.round(q)) and q.min() >= -8 and q.max() <= 7


@pytest.mark.parametrize("group,blocksize", [(32, 64), (64, 128), (256, 128)])
def test_fixed_mask_sweep_matches_the_naive_reference(group, blocksize):
    """sparsegpt(mask=M): GPTQ under a given mask, against the plain float64 sweep with that mask."""
    W, H = _problem(group)
    M = torch.rand(W.shape) < 0.6
    quant = GroupQuantizer(*W.shape, 4, group)
    Wn, mask, _ = sparsegpt(W, H, 0.0, blocksize=blocksize, quantizer=quant, mask=M)
    ref, _, ref_scale = naive_joint(W, H, 0.0, blocksize, group, fixed_mask=M)
    assert torch.equal(mask, M) and bool((Wn[M] == 0).all()) and _on_grid(Wn, quant)
    assert torch.allclose(quant.scale.double(), ref_scale, rtol=0.05)
    assert ((Wn == 0) == (ref == 0)).float().mean() >= 0.99
    assert ((Wn.double() - ref).abs() <= 0.02 * float(ref.abs().max())).float().mean() >= 0.99


@pytest.mark.parametrize("clip", [False, True])
def test_alps_joint_grid_keeps_its_mask_and_beats_rounding_after(clip):
    """ALPS with a group grid: the ALPS mask, every weight on its group's grid, and less error added to ALPS's
    own than round-to-nearest after ALPS adds (the max |w| / 7 scale rule)."""
    from sparse_export.pruning.pruners import alps, reconstruction_error

    W, H = _problem(7, mixed=True)
    plain, pmask, _ = alps(W, H, 0.5)
    quant = GroupQuantizer(*W.shape, 4, 64, clip_search=clip)
    Wn, mask, err = alps(W, H, 0.5, quantizer=quant)
    assert torch.equal(mask, pmask) and bool((Wn[mask] == 0).all()) and _on_grid(Wn, quant)
    assert err == pytest.approx(reconstruction_error(W, Wn, H))
    s = (plain.reshape(24, -1, 64).abs().amax(dim=2) / 7).half().float().repeat_interleave(64, dim=1)
    rounded = torch.clamp(torch.round(plain / s), -8, 7) * s
    base = reconstruction_error(W, plain, H)                 # the pruning's own error; quantization adds to it
    assert err - base < 0.9 * (reconstruction_error(W, rounded, H) - base)


@pytest.mark.parametrize("weighted", [False, True])
def test_clip_search_picks_the_least_error_candidate(weighted):
    """Each row's scale is the candidate (CLIP_FACTORS x max|w| / 7, float16 values) of least squared rounding
    error (each column's weighted by its importance when given), checked by brute force; on heavy-tailed
    weights it is often below the largest weight's."""
    from sparse_export.pruning.grid import CLIP_FACTORS, clip_scales

    torch.manual_seed(0)
    W = torch.distributions.StudentT(3.0).sample((64, 64))
    imp = torch.rand(64) * 4 if weighted else None
    top = W.abs().amax(dim=1) / 7
    got = clip_scales(W, top, 7, imp)
    for r in range(W.shape[0]):
        errs = []
        for f in CLIP_FACTORS:
            s = float(torch.tensor(float(top[r]) * f).half())
            e = (torch.clamp(torch.round(W[r] / s), -8, 7) * s - W[r]) ** 2
            errs.append((float((e * imp).sum() if weighted else e.sum()), s))
        best = min(e for e, _ in errs)
        assert float(got[r]) in [s for e, s in errs if e <= best * (1 + 1e-6)]
    assert (got < top.half().float()).float().mean() > 0.3


def test_clip_search_lowers_the_joint_error():
    from sparse_export.pruning.pruners import reconstruction_error

    W, H = _problem(11)
    W = W * torch.distributions.StudentT(3.0).sample((W.shape[0], 1)).abs()
    errs = []
    for clip in (False, True):
        quant = GroupQuantizer(*W.shape, 4, 32, clip_search=clip)
        Wn, _, _ = sparsegpt(W, H, 0.5, quantizer=quant)
        assert _on_grid(Wn, quant)
        errs.append(reconstruction_error(W, Wn, H))
    assert errs[1] < errs[0]


@pytest.fixture(scope="module")
def group_dir(tiny_dirs, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("g4") / "p"
    prune(tiny_dirs["llama"], out, Recipe(sparsity=0.5, wbits=4, group_size=32, calib=str(text_file), nsamples=4,
                                          seqlen=64), log=lambda *_: None)
    return out


def test_group_folder_records_the_grid_and_reads_back_exactly(group_dir):
    meta = read_meta(group_dir)
    assert meta["recipe"]["group_size"] == 32 and meta["quantization"]["group_size"] == 32
    assert meta["recipe"]["clip_search"] is True                     # the default with a group size
    assert Recipe(wbits=8).clip_search is False and Recipe(wbits=4, group_size=64, clip_search=False).clip_search is False
    assert meta["quantization"]["granularity"] == "per-group" and meta["quantization"]["bits"] == 4
    model, _ = models.load_model(group_dir)
    names = models.prunable_names(model)
    scales = recorded_scales(meta, names)
    assert set(scales) == set(names)
    for name in names:
        W = models.weight_2d(model.get_submodule(name)).float()
        s = torch.tensor(scales[name])
        assert s.shape == (W.shape[0], W.shape[1] // 32)
        q = int_weight(W, scales[name], bits=4)                     # exact: distance 0 steps
        assert torch.equal(q.float() * s.repeat_interleave(32, dim=1), W)
        assert float((W == 0).float().mean()) >= 0.5
    with pytest.raises(UserError):                                   # off the grid: refused
        int_weight(W + 0.3 * s.repeat_interleave(32, dim=1), scales[name], bits=4)
    with pytest.raises(UserError, match="4-bit group-wise"):
        check_int8_grid(meta)


def test_cli_alps_group_grid_with_clip_search(tiny_dirs, text_file, tmp_path):
    out = tmp_path / "alps4"
    assert main(["prune", str(tiny_dirs["llama"]), "--out", str(out), "--calib", str(text_file), "--nsamples", "4",
                 "--seqlen", "32", "--method", "alps", "--wbits", "4", "--group-size", "32", "--clip-search",
                 "--alps-iters", "3", "--threads", "1"]) == 0
    meta = read_meta(out)
    assert meta["recipe"]["clip_search"] is True and meta["quantization"]["method"] == "joint-alps"
    model, _ = models.load_model(out)
    for name in models.prunable_names(model):
        W = models.weight_2d(model.get_submodule(name)).float()
        s = torch.tensor(meta["matrices"][name]["scale"]).repeat_interleave(32, dim=1)
        assert torch.equal(int_weight(W, meta["matrices"][name]["scale"], bits=4).float() * s, W)


def one_line_error(code, err):
    lines = [x for x in err.strip().splitlines() if x.strip()]
    return code != 0 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err


@pytest.mark.parametrize("stream", [False, True])
def test_group_size_that_does_not_divide_is_a_one_line_error(tiny_dirs, text_file, tmp_path, capsys, stream):
    out = tmp_path / "bad"
    code = main(["prune", str(tiny_dirs["llama"]), "--out", str(out), "--calib", str(text_file), "--nsamples", "4",
                 "--seqlen", "32", "--wbits", "4", "--group-size", "256"] + (["--stream"] if stream else []))
    err = capsys.readouterr().err
    assert one_line_error(code, err) and "does not divide the input width" in err
    assert not out.exists()


def test_streamed_group_prune_equals_in_memory(tiny_dirs, text_file, tmp_path):
    """--stream with group grids: the same weights and scales as the in-memory prune."""
    a, b = tmp_path / "mem", tmp_path / "stream"
    args = ["--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "--wbits", "4", "--group-size", "64",
            "--threads", "1"]
    assert main(["prune", str(tiny_dirs["llama"]), "--out", str(a), "--no-stream"] + args) == 0
    assert main(["prune", str(tiny_dirs["llama"]), "--out", str(b), "--stream"] + args) == 0
    ma, mb = read_meta(a), read_meta(b)
    for name, entry in ma["matrices"].items():
        assert entry["scale"] == mb["matrices"][name]["scale"]
    wa, _ = models.load_model(a)
    wb, _ = models.load_model(b)
    for (n, x), (_, y) in zip(wa.state_dict().items(), wb.state_dict().items()):
        assert torch.equal(x, y), n


def test_round_pruned_folder_group_grid(tiny_dirs, tmp_path):
    """Prune then round onto a 4-bit group grid (the random-weight speed rows): every matrix reads back exactly
    with its out x groups scales, float16-valued, and no zero of the pruned folder comes back."""
    from sparse_export.pruning.jobs import round_pruned_folder

    pruned = tmp_path / "mag"
    prune(tiny_dirs["llama"], pruned, Recipe(method="magnitude", sparsity=0.5), log=lambda *a: None)
    out = tmp_path / "w4g32"
    meta = round_pruned_folder(pruned, out, 4, group_size=32, log=lambda *a: None)
    assert meta["recipe"]["group_size"] == 32 and meta["quantization"]["granularity"] == "per-group"
    before, _ = models.load_model(pruned)
    after, _ = models.load_model(out)
    for name in models.prunable_names(after):
        w = models.weight_2d(after.get_submodule(name))
        scale = torch.tensor(read_meta(out)["matrices"][name]["scale"])
        assert scale.shape == (w.shape[0], w.shape[1] // 32)
        assert torch.equal(scale.half().float(), scale)
        q = int_weight(w, scale, 4, name=name)
        assert int(q.abs().max()) == 7                       # the largest weight of some group sits at the end
        w0 = models.weight_2d(before.get_submodule(name))
        assert bool(((w0 == 0) <= (q == 0)).all())           # zeros stay zero
    with pytest.raises(UserError, match="does not divide"):
        round_pruned_folder(pruned, tmp_path / "bad", 4, group_size=48, log=lambda *a: None)
