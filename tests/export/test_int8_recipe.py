"""`export onnx --int8` takes its calibration text from the pruned folder's recipe when --calib is not given."""

import json

import pytest

from sparse_export.errors import UserError
from sparse_export.export.onnx_int8 import ACT_NSAMPLES, ACT_SEQLEN, export_int8, int8_calibration
from sparse_export.outputs import read_meta
from sparse_export.pruning import jobs
from sparse_export.pruning.recipe import Recipe


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def pruned(tiny_dirs, text_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8recipe") / "p"
    jobs.prune(tiny_dirs["llama"], folder, Recipe(calib=str(text_file), nsamples=4, seqlen=64, seed=3), log=quiet)
    return folder


def test_calibration_comes_from_the_recipe(pruned, text_file):
    assert int8_calibration(pruned) == {"source": str(text_file), "nsamples": 4, "seqlen": 64, "seed": 3,
                                        "from": "recipe"}
    given = int8_calibration(pruned, calib="self", nsamples=2)
    assert (given["source"], given["nsamples"], given["from"]) == ("self", 2, "options")


def test_recipe_sizes_are_capped_at_the_int8_defaults(pruned, tmp_path):
    meta = read_meta(pruned)
    meta["recipe"].update(nsamples=128, seqlen=2048)
    (tmp_path / "sparse_export.json").write_text(json.dumps(meta))
    got = int8_calibration(tmp_path)
    assert (got["nsamples"], got["seqlen"]) == (ACT_NSAMPLES, ACT_SEQLEN)


def test_no_recipe_or_a_magnitude_recipe_falls_back_to_c4(tiny_dirs, pruned, tmp_path):
    assert int8_calibration(tiny_dirs["llama"])["source"] == "c4"
    meta = read_meta(pruned)
    meta["recipe"]["method"] = "magnitude"  # never read its calibration source
    (tmp_path / "sparse_export.json").write_text(json.dumps(meta))
    assert int8_calibration(tmp_path)["from"] == "defaults"


def test_a_missing_recipe_file_says_to_pass_calib(pruned, tmp_path):
    meta = read_meta(pruned)
    meta["recipe"]["calib"] = "no/such/calibration.jsonl"
    (tmp_path / "sparse_export.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="pass --calib"):
        int8_calibration(tmp_path)


def test_cli_int8_without_calib_equals_explicit_recipe(pruned, text_file, tmp_path):
    """Offline (the tests set HF_HUB_OFFLINE): without --calib the export reads the recipe's local file,
    and its activation scales equal those of an export told the same text explicitly."""
    from sparse_export.cli.main import main

    assert main(["export", "onnx", str(pruned), "--int8", "--out", str(tmp_path / "auto")]) == 0
    export_int8(pruned, tmp_path / "explicit", calib=str(text_file), nsamples=4, seqlen=64, seed=3, log=quiet)
    auto, explicit = read_meta(tmp_path / "auto")["int8"], read_meta(tmp_path / "explicit")["int8"]
    assert auto["calibration"]["from"] == "recipe" and auto["calibration"]["source"] == str(text_file)
    assert auto["activations"]["qparams"] == explicit["activations"]["qparams"]
    assert auto["attention"]["qparams"] == explicit["attention"]["qparams"]
