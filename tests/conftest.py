"""Shared fixtures: tiny random models of each supported architecture, and a tiny tokenizer."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.tiny import ARCHS, TEXT, save_tiny, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "corpus.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer):
    """{arch: folder} of saved tiny random models (dense)."""
    root = tmp_path_factory.mktemp("tiny")
    return {a: save_tiny(a, root / a, tokenizer) for a in ARCHS}


@pytest.fixture
def no_threads():
    torch.set_num_threads(1)
    yield
