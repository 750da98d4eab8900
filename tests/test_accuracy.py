"""KL divergence and top-1 agreement against a hand computation; greedy completions are deterministic."""

import math

import torch

from sparse_export.accuracy import distribution_shift, greedy_completions, next_token_logprobs
from tests.tiny import tiny_model


def test_distribution_shift_by_hand():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    q = torch.tensor([[0.25, 0.5, 0.25], [0.1, 0.7, 0.2]])
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.25 * math.log(0.25 / 0.5) + 0.25 * math.log(1.0)
    kl1 = 0.1 * math.log(1.0) + 0.8 * math.log(0.8 / 0.7) + 0.1 * math.log(0.1 / 0.2)
    r = distribution_shift(p.log(), q.log())
    assert math.isclose(r["kl_nats_per_token"], (kl0 + kl1) / 2, rel_tol=1e-5)
    assert r["top1_agreement"] == 0.5 and r["tokens"] == 2      # argmax 0 vs 1, then 1 vs 1
    same = distribution_shift(p.log(), p.log())
    assert same["kl_nats_per_token"] == 0 and same["top1_agreement"] == 1


def test_a_pruned_model_moves_its_distribution(tokenizer):
    dense = tiny_model("llama", len(tokenizer))
    windows = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    ref = next_token_logprobs(dense, windows, batch=1)
    assert ref.shape == (2, 12, len(tokenizer)) and torch.allclose(ref.exp().sum(-1), torch.ones(2, 12))
    pruned = tiny_model("llama", len(tokenizer))
    with torch.no_grad():
        for name, p in pruned.named_parameters():
            if "layers" in name and p.dim() == 2:
                p.mul_(torch.rand_like(p) > 0.5)
    shift = distribution_shift(ref, next_token_logprobs(pruned, windows))
    assert shift["kl_nats_per_token"] > 1e-4 and shift["top1_agreement"] < 1
    assert distribution_shift(ref, next_token_logprobs(dense, windows))["kl_nats_per_token"] < 1e-6


def test_greedy_completions_are_deterministic(tokenizer):
    model = tiny_model("llama", len(tokenizer))
    a = greedy_completions(model, tokenizer, ("the model", "data"), new_tokens=5)
    assert a == greedy_completions(model, tokenizer, ("the model", "data"), new_tokens=5) and len(a) == 2
