"""Bad input to `recover`: one line, exit 2, nothing left behind."""

import pytest

from sparse_export.cli.main import main
from tests.recovery.conftest import pruned_copy
from tests.tiny import tiny_config, tiny_model


def _run(capsys, tmp_path, pruned, teacher, data, *extra, out=None):
    out = out or tmp_path / "rec"
    rc = main(["recover", str(pruned), "--teacher", str(teacher), "--data", str(data), "--out", str(out),
               "--steps", "2", "--seqlen", "32", "--threads", "1", *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert not out.exists() and not out.with_name(out.name + ".ckpt").exists()
    if out.parent.is_dir():
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]
    return lines[0]


def _save(model, folder, tokenizer):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_teacher_of_another_shape(pruned_llama, tmp_path, tokenizer, text_file, capsys):
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.intermediate_size = 96
    teacher = _save(AutoModelForCausalLM.from_config(config), tmp_path / "t", tokenizer)
    assert "another shape" in _run(capsys, tmp_path, pruned_llama, teacher, text_file)


def test_teacher_of_another_vocabulary(pruned_llama, tmp_path, tokenizer, text_file, capsys):
    teacher = _save(tiny_model("llama", vocab_size=320), tmp_path / "t", tokenizer)
    assert "vocabulary" in _run(capsys, tmp_path, pruned_llama, teacher, text_file)


def test_teacher_of_another_architecture(pruned_llama, tiny_dirs, tmp_path, text_file, capsys):
    assert "opt" in _run(capsys, tmp_path, pruned_llama, tiny_dirs["opt"], text_file)


def test_student_not_pruned(tiny_dirs, tmp_path, text_file, capsys):
    dense = tiny_dirs["llama"]
    assert "not a pruned model" in _run(capsys, tmp_path, dense, dense, text_file)
    unpruned = pruned_copy(dense, tmp_path / "zero", text_file, sparsity=0.0)
    assert "no zero weights" in _run(capsys, tmp_path, unpruned, dense, text_file)


def test_missing_and_empty_data(pruned_llama, tiny_dirs, tmp_path, capsys):
    assert "not found" in _run(capsys, tmp_path, pruned_llama, tiny_dirs["llama"], tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert "empty" in _run(capsys, tmp_path, pruned_llama, tiny_dirs["llama"], empty)


def test_evaluation_text_refused(pruned_llama, tiny_dirs, tmp_path, text_file, capsys):
    wiki = tmp_path / "wiki.test.raw"
    wiki.write_text("x")
    assert "evaluation text" in _run(capsys, tmp_path, pruned_llama, tiny_dirs["llama"], wiki)
    assert "eval-data" in _run(capsys, tmp_path, pruned_llama, tiny_dirs["llama"], text_file,
                               "--eval-data", str(text_file))


def test_unwritable_out_and_checkpoint(pruned_llama, tiny_dirs, tmp_path, text_file, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert "cannot write --out" in _run(capsys, tmp_path, pruned_llama, tiny_dirs["llama"], text_file,
                                        out=blocker / "rec")
    assert "checkpoint" in _run(capsys, tmp_path, pruned_llama, tiny_dirs["llama"], text_file,
                                "--checkpoint-dir", str(blocker / "ckpt"))


def test_resume_without_checkpoint(pruned_llama, tiny_dirs, tmp_path, text_file, capsys):
    assert "no checkpoint" in _run(capsys, tmp_path, pruned_llama, tiny_dirs["llama"], text_file, "--resume")


@pytest.mark.parametrize("flags", [["--batch", "0"], ["--lr", "-1"], ["--kl-weight", "0", "--hidden-weight", "0"]])
def test_bad_settings(pruned_llama, tiny_dirs, tmp_path, text_file, capsys, flags):
    _run(capsys, tmp_path, pruned_llama, tiny_dirs["llama"], text_file, *flags)
