"""Pruned tiny models to recover."""

import pytest

from sparse_export.pruning.jobs import prune
from sparse_export.pruning.recipe import Recipe


def pruned_copy(dense, out, text_file, **recipe):
    kw = dict(method="magnitude", sparsity=0.5)
    kw.update(recipe)
    if kw["method"] != "magnitude":
        kw.update(calib=str(text_file), nsamples=4, seqlen=32)
    prune(dense, out, Recipe(**kw), threads=1, log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def pruned_llama(tiny_dirs, tmp_path_factory, text_file):
    return pruned_copy(tiny_dirs["llama"], tmp_path_factory.mktemp("pruned") / "llama", text_file)


@pytest.fixture(scope="session")
def eval_file(tmp_path_factory):
    from tests.tiny import _make_text

    p = tmp_path_factory.mktemp("eval") / "held.txt"
    p.write_text(_make_text(200, seed=1))
    return p
