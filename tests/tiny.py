"""Tiny random causal LMs built from configs, and a tiny byte-level BPE tokenizer trained in memory."""

import random

import torch

ARCHS = ["llama", "mistral", "qwen2", "opt", "gpt2", "gpt_neox", "bloom"]

_WORDS = ("the model prunes weights while the hessian keeps error small and every layer sees its "
          "own inputs so sparse networks run faster on servers with many cores and little memory "
          "data flows from load to calibrate to prune to save to export to verify to benchmark").split()


def _make_text(n_lines=400, seed=0):
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        if i % 7 == 0:
            lines.append("")
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 20))) + ".")
    return "\n".join(lines)


TEXT = _make_text()


def tiny_tokenizer(vocab_size=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>",
                                   bos_token="<eos>")


def tiny_config(arch, vocab_size=300):
    from transformers import AutoConfig

    h, inner, layers, heads = 64, 128, 2, 4
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch in ("llama", "mistral", "qwen2"):
        kw = dict(hidden_size=h, intermediate_size=inner, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=512)
    elif arch == "opt":
        kw = dict(hidden_size=h, ffn_dim=inner, num_hidden_layers=layers, num_attention_heads=heads,
                  word_embed_proj_dim=h, max_position_embeddings=512)
    elif arch == "gpt2":
        kw = dict(n_embd=h, n_inner=inner, n_layer=layers, n_head=heads, n_positions=512)
    elif arch == "gpt_neox":
        kw = dict(hidden_size=h, intermediate_size=inner, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position_embeddings=512)
    elif arch == "bloom":
        kw = dict(hidden_size=h, n_layer=layers, n_head=heads)
    else:
        raise ValueError(arch)
    return AutoConfig.for_model(arch, **common, **kw)


def tiny_model(arch, vocab_size=300, seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size))
    return model.eval()  # a model built from a config starts with dropout on


def save_tiny(arch, folder, tokenizer, seed=0):
    model = tiny_model(arch, len(tokenizer), seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
