"""Output folders: created with the user's umask (not mkdtemp's 0700), paths in JSON moved to where the
files are after the rename."""

import os

import pytest
import torch
from safetensors.torch import save_file

from sparse_export.outputs import atomic_dir, read_meta, relocate, relocate_meta_files, write_json


@pytest.mark.parametrize("mask,dirs,files", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_modes_follow_the_umask(tmp_path, mask, dirs, files):
    old = os.umask(mask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
            write_json(tmp / "sub" / "a.json", {})
            save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "w.safetensors"))   # safetensors writes 0600
            with atomic_dir(tmp / "nested") as inner:     # what prune-and-export does with pruned-model/
                write_json(inner / "b.json", {})
    finally:
        os.umask(old)
    out = tmp_path / "out"
    for d in (out, out / "sub", out / "nested"):
        assert d.stat().st_mode & 0o777 == dirs, d
    for f in (out / "sub" / "a.json", out / "sub" / "w.safetensors", out / "nested" / "b.json"):
        assert f.stat().st_mode & 0o777 == files, f


def test_relocate(tmp_path):
    tmp = tmp_path / ".out.tmp-x"
    obj = {"a": str(tmp / "onnx-sparse"), "b": [str(tmp), "other", str(tmp_path / ".out.tmp-xy")], "c": 3}
    assert relocate(obj, tmp) == {"a": "onnx-sparse", "b": [".", "other", str(tmp_path / ".out.tmp-xy")], "c": 3}
    assert relocate(obj, tmp, tmp_path / "out")["a"] == str(tmp_path / "out" / "onnx-sparse")
    (tmp / "d").mkdir(parents=True)
    write_json(tmp / "d" / "sparse_export.json", {"source_model": str(tmp / "pruned-model")})
    relocate_meta_files(tmp, tmp_path / "out")
    assert read_meta(tmp / "d")["source_model"] == str(tmp_path / "out" / "pruned-model")
