"""Training text: calibration sources, `self` (the teacher writes it), the evaluation text refused."""

import pytest
import torch

from sparse_export.errors import UserError
from sparse_export.recovery.train_data import check_training_source, training_windows
from tests.tiny import tiny_model


def test_self_text_is_the_teachers_and_seeded(tokenizer):
    teacher = tiny_model("llama")
    a = training_windows("self", tokenizer, 5, 12, seed=3, teacher=teacher, self_pool=2)
    b = training_windows("self", tokenizer, 5, 12, seed=3, teacher=teacher, self_pool=2)
    assert a.shape == (5, 12) and torch.equal(a, b)
    assert len({tuple(r) for r in a.tolist()}) == 2          # a pool of two windows, cycled
    c = training_windows("self", tokenizer, 5, 12, seed=4, teacher=teacher, self_pool=2)
    assert not torch.equal(a, c)


def test_file_windows(tokenizer, text_file):
    w = training_windows(str(text_file), tokenizer, 6, 16, seed=0)
    assert w.shape == (6, 16) and torch.equal(w, training_windows(str(text_file), tokenizer, 6, 16, seed=0))


@pytest.mark.parametrize("source", ["wikitext2", "/x/wikitext2-raw/wiki.test.raw"])
def test_evaluation_text_refused(source):
    with pytest.raises(UserError, match="evaluation text"):
        check_training_source(source)
