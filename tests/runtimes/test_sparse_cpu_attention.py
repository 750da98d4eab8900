"""The native decode step's attention at the head sizes of real models (64: SmolLM2, TinyLlama; 128: Llama-3),
where the AVX-512 path runs each KV head's group of query heads together: the same logits as the scalar
path, bit for bit, alone and batched, and the same as the torch loop up to float order."""

import numpy as np
import pytest
import torch

from sparse_export.runtimes.sparse_cpu import kernel as K
from sparse_export.runtimes.sparse_cpu.decoder import LeanCache
from tests.runtimes.test_sparse_cpu_batch import _alone
from tests.tiny import tiny_config

pytestmark = pytest.mark.skipif(not K.has_avx512(), reason="CPU lacks AVX-512 VBMI2/VNNI")


def _llama(folder, tokenizer, head_dim, heads, kv_heads):
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama", len(tokenizer))
    config.hidden_size, config.num_attention_heads, config.num_key_value_heads = head_dim * heads, heads, kv_heads
    config.head_dim, config.intermediate_size, config.initializer_range = head_dim, 192, 0.2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tokenizer, tmp_path_factory):
    """Query heads per KV head: 6 at head size 64 (two chunks of 3), 3 at head size 128 (chunks of 2 and 1),
    and 1."""
    root = tmp_path_factory.mktemp("attn")
    return [_llama(root / "d64", tokenizer, 64, 12, 2), _llama(root / "d128", tokenizer, 128, 3, 1),
            _llama(root / "d64mha", tokenizer, 64, 2, 2)]


def _session(folder, path, native=True):
    from sparse_export.runtimes.sparse_cpu.session import DecodeSession

    return DecodeSession(folder, "sparse-cpu", threads=2, path=path, native=native)


def _decode(session, prompt, feed):
    """Logits of each one-token step after the prompt, from a cache of 32 that doubles on the way."""
    d = session.decoder
    return _alone(session, prompt, feed, LeanCache(len(d.layers), d.KV, d.D, capacity=32))


def test_grouped_attention_equals_the_scalar_path(models):
    """Cache lengths 29..47 (not multiples of 16, across a capacity doubling): every step's logits on the
    AVX-512 path equal the scalar path's bit for bit, and the torch loop's up to float order (and the odd
    activation rounding to the other int8 step: these random models amplify one such flip to ~1.5% of the
    logits' range, where wrong attention moves them by their whole range)."""
    rng = np.random.default_rng(0)
    for folder in models:
        prompt, feed = rng.integers(5, 250, 29).tolist(), rng.integers(5, 250, 18).tolist()
        fast = _decode(_session(folder, "avx512"), prompt, feed)
        scalar = _decode(_session(folder, "scalar"), prompt, feed)
        torch_loop = _decode(_session(folder, "avx512", native=False), prompt, feed)
        for a, b, c in zip(fast, scalar, torch_loop):
            assert np.array_equal(a, b), folder.name
            assert np.abs(a - c).max() <= 3e-2 * np.abs(c).max(), folder.name


def test_grouped_attention_batched_equals_alone(models):
    """Three sequences of different lengths in one batched step: each row is its sequence's own step."""
    from sparse_export.runtimes.sparse_cpu.batch import BatchSession

    rng = np.random.default_rng(1)
    for folder in models:
        session = _session(folder, "avx512")
        prompts = [rng.integers(5, 250, n).tolist() for n in (3, 17, 40)]
        feeds = [rng.integers(5, 250, 5).tolist() for _ in prompts]
        want = [_decode(session, p, f) for p, f in zip(prompts, feeds)]
        batch = BatchSession(session, max_batch=3, max_context=64)
        slots = [batch.prefill(p, len(p) + len(f))[0] for p, f in zip(prompts, feeds)]
        for step in range(5):
            logits = batch.step(slots, [f[step] for f in feeds])
            for row in range(3):
                assert np.array_equal(logits[row], want[row][step]), (folder.name, step, row)
