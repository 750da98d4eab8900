"""What pruning cost, measured without a data set: how far the pruned model's next-token
distribution moves from the dense model's (KL divergence, top-1 agreement) on held-out tokens, and
greedy completions of a few fixed prompts, side by side."""

import torch
import torch.nn.functional as F

# Fixed prompts whose completions a reader can judge at a glance.
PROMPTS = ("The capital of France is", "The largest planet in the solar system is",
           "Water boils at a temperature of", "def fibonacci(n):")


@torch.no_grad()
def next_token_logprobs(model, windows: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """log-softmax of the next-token logits at every position: float32 [windows, seqlen, vocab]."""
    out = []
    for s in range(0, windows.shape[0], batch):
        logits = model(input_ids=windows[s:s + batch], use_cache=False).logits.float()
        out.append(F.log_softmax(logits, dim=-1))
    return torch.cat(out)


def distribution_shift(reference: torch.Tensor, logprobs: torch.Tensor) -> dict:
    """KL(reference || model) in nats per token and the share of tokens whose most likely next token is the
    same, from log-probabilities of equal shape [..., vocab]."""
    ref, got = reference.reshape(-1, reference.shape[-1]), logprobs.reshape(-1, logprobs.shape[-1])
    kl = (ref.exp() * (ref - got)).sum(dim=-1)
    return {"kl_nats_per_token": float(kl.mean()), "kl_p90": float(torch.quantile(kl, 0.9)),
            "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean()), "tokens": int(ref.shape[0])}


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts=PROMPTS, new_tokens: int = 16) -> list[str]:
    """The greedy continuation of each prompt (text after the prompt, one line)."""
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                             pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(seq[0, ids.shape[1]:], skip_special_tokens=True)
        out.append(" ".join(text.split()))
    return out
