"""The batched native decode step: B sequences in one call give each sequence's own logits, bit for bit."""

import numpy as np
import pytest
import torch

from sparse_export.runtimes.sparse_cpu import kernel as K
from tests.runtimes.test_sparse_cpu import _lively_tiny, _session


@pytest.fixture(scope="module")
def folders(tokenizer, text_file, tmp_path_factory):
    """A tiny lively llama (dense int8 after rounding), the same pruned 70% (bitmask layout) and 50% with
    4-bit group-32 weights (the int4 kernel under the batched step)."""
    from sparse_export.pruning.jobs import prune
    from sparse_export.pruning.recipe import Recipe

    root = tmp_path_factory.mktemp("batch")
    dense = _lively_tiny("llama", root / "dense", tokenizer)
    sparse = root / "mag"
    prune(dense, sparse, Recipe(method="magnitude", sparsity=0.7), log=lambda *_: None)
    int4 = root / "int4"
    prune(dense, int4, Recipe(sparsity=0.5, wbits=4, group_size=32, calib=str(text_file), nsamples=4, seqlen=64),
          log=lambda *_: None)
    return [dense, sparse, int4]


def _alone(session, prompt, tokens, cache=None):
    """Logits of each step of one sequence decoding alone (prefill, then one native step per token);
    cache: the one to start with (None: the session's default)."""
    logits, cache = session.run([prompt], 0, cache)
    out, n = [], len(prompt)
    for t in tokens:
        logits, cache = session.run([[t]], n, cache)
        out.append(logits[0, -1])
        n += 1
    return out


@pytest.mark.parametrize("path", ["scalar", "avx512"])
def test_batched_step_equals_each_sequence_alone(folders, path):
    """11 sequences (more than the kernel's 8 rows per pass) of different prompt lengths, joining and
    leaving the batch at different steps: every row of every batched step equals that sequence's own step."""
    from sparse_export.runtimes.sparse_cpu.batch import BatchSession

    if path == "avx512" and not K.has_avx512():
        pytest.skip("no AVX-512 VBMI2 + VNNI here")
    rng = np.random.default_rng(0)
    for folder in folders:
        session = _session(folder, "sparse-cpu", path=path)
        batch = BatchSession(session, max_batch=11, max_context=64)
        prompts = [rng.integers(5, 250, int(n)).tolist() for n in rng.integers(1, 30, 11)]
        feeds = [rng.integers(5, 250, 12).tolist() for _ in prompts]
        start = [0, 0, 0, 1, 1, 2, 3, 3, 5, 5, 6]             # step at which sequence i joins
        want = [_alone(session, p, f) for p, f in zip(prompts, feeds)]
        slots, fed = {}, {}
        for step in range(20):
            for i, s in enumerate(start):
                if s == step:
                    slots[i], _ = batch.prefill(prompts[i], len(prompts[i]) + len(feeds[i]))
                    fed[i] = 0
            live = [i for i in slots if fed[i] < len(feeds[i]) - (i % 3)]   # some leave early
            if not live:
                break
            logits = batch.step([slots[i] for i in live], [feeds[i][fed[i]] for i in live])
            assert logits.shape[0] == len(live)
            for row, i in enumerate(live):
                assert np.array_equal(logits[row], want[i][fed[i]]), (folder.name, path, step, i)
                fed[i] += 1
            for i in [i for i in slots if fed[i] >= len(feeds[i]) - (i % 3)]:
                batch.release(slots.pop(i))
        assert not batch.slots and batch.reserved == 0
        assert sum(fed.values()) == sum(len(f) - i % 3 for i, f in enumerate(feeds))


def test_budget_and_slot_limits(folders):
    from sparse_export.errors import UserError
    from sparse_export.runtimes.sparse_cpu.batch import BatchSession

    session = _session(folders[0], "sparse-cpu")
    d = session.decoder
    per_token = 2 * len(d.layers) * d.KV * d.D * 4
    batch = BatchSession(session, max_batch=2, max_context=64, kv_budget=40 * per_token)
    assert batch.budget_tokens == 40 and batch.can_admit(40) and not batch.can_admit(41)
    a, _ = batch.prefill([5, 6, 7], 30)
    assert not batch.can_admit(11) and batch.can_admit(10)
    b, _ = batch.prefill([8, 9], 10)
    assert not batch.can_admit(1)                            # max_batch reached
    with pytest.raises(UserError):
        batch.prefill([1], 2)
    batch.step([a, b], [3, 4])
    with pytest.raises(UserError):                           # b may hold 10 tokens: 2 + 8 steps
        for _ in range(9):
            batch.step([b], [5])
    batch.release(a)
    batch.release(b)
    assert batch.reserved == 0 and batch.can_admit(40)
    assert torch.get_num_threads() >= 1
