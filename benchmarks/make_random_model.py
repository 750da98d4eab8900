"""Write a random-weight Llama-family model folder with the exact shapes of a real one, as bf16 safetensors
shards (one per decoder layer, written one at a time, so memory stays at one layer), plus SmolLM2's
tokenizer. Random weights measure memory and time, not quality.

  python benchmarks/make_random_model.py --shape llama-3-8b --out /data/llama3-8b-random      # 16 GB on disk
  python benchmarks/make_random_model.py --shape tinyllama-1.1b --out /tmp/tinyllama-random
  python benchmarks/make_random_model.py --shape tiny --layers 4 --out /tmp/tiny-random        # seconds

SmolLM2's tokenizer has 49152 ids: below the vocabularies of Llama-3 (128256), so every id it writes is a
row of the embedding. TinyLlama's vocabulary (32000) is smaller: it is raised to 49152 for the same reason.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from sparse_export import models
from sparse_export.checkpoints import shard_name, write_index, write_shard

SHAPES = {  # layers, hidden, intermediate, heads, kv heads, vocab, tied embeddings, rope theta
    "llama-3-8b": dict(layers=32, hidden=4096, inner=14336, heads=32, kv=8, vocab=128256, tied=False, theta=500000.0),
    "llama-3.2-3b": dict(layers=28, hidden=3072, inner=8192, heads=24, kv=8, vocab=128256, tied=True, theta=500000.0),
    "tinyllama-1.1b": dict(layers=22, hidden=2048, inner=5632, heads=32, kv=4, vocab=32000, tied=False, theta=10000.0),
    "tiny": dict(layers=2, hidden=256, inner=704, heads=4, kv=2, vocab=49152, tied=False, theta=10000.0),
}
TOKENIZER_VOCAB = 49152  # SmolLM2


def config_for(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=max(shape["vocab"], TOKENIZER_VOCAB), hidden_size=shape["hidden"],
                       intermediate_size=shape["inner"], num_hidden_layers=shape["layers"],
                       num_attention_heads=shape["heads"], num_key_value_heads=shape["kv"],
                       max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=shape["tied"],
                       rope_theta=shape["theta"], bos_token_id=1, eos_token_id=2, dtype="bfloat16",
                       architectures=["LlamaForCausalLM"])


def _rand(g, *shape, std=0.02):
    return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)


def layer_tensors(cfg, i: int, g) -> dict:
    h, inner = cfg.hidden_size, cfg.intermediate_size
    d = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * d
    p = f"model.layers.{i}."
    return {p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": _rand(g, h, h), p + "self_attn.k_proj.weight": _rand(g, kv, h),
            p + "self_attn.v_proj.weight": _rand(g, kv, h), p + "self_attn.o_proj.weight": _rand(g, h, h),
            p + "mlp.gate_proj.weight": _rand(g, inner, h), p + "mlp.up_proj.weight": _rand(g, inner, h),
            p + "mlp.down_proj.weight": _rand(g, h, inner)}


def write_model(shape: dict, out: Path, seed: int = 0, log=print) -> Path:
    cfg = config_for(shape)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    n = cfg.num_hidden_layers + 2
    t0 = time.time()
    write_shard(out / shard_name(1, n), {"model.embed_tokens.weight": _rand(g, cfg.vocab_size, cfg.hidden_size)})
    for i in range(cfg.num_hidden_layers):
        write_shard(out / shard_name(i + 2, n), layer_tensors(cfg, i, g))
        log(f"  layer {i + 1}/{cfg.num_hidden_layers} written ({time.time() - t0:.0f}s)")
    last = {"model.norm.weight": torch.ones(cfg.hidden_size, dtype=torch.bfloat16)}
    if not cfg.tie_word_embeddings:
        last["lm_head.weight"] = _rand(g, cfg.vocab_size, cfg.hidden_size)
    write_shard(out / shard_name(n, n), last)
    from safetensors import safe_open

    weight_map, total = {}, 0
    for k in range(1, n + 1):
        with safe_open(str(out / shard_name(k, n)), framework="pt") as f:
            for name in f.keys():
                weight_map[name] = shard_name(k, n)
                t = f.get_slice(name)
                numel = 1
                for s in t.get_shape():
                    numel *= s
                total += numel * 2
    write_index(out, weight_map, total)
    cfg.save_pretrained(out)
    _, tokenizer = models.load_model("smollm2")
    tokenizer.save_pretrained(out)
    (out / "random_model.json").write_text(json.dumps({"shape": shape, "seed": seed, "bytes": total}, indent=2))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="llama-3-8b")
    ap.add_argument("--layers", type=int, help="override the number of decoder layers")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["layers"] = args.layers
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} exists and is not empty")
    write_model(shape, args.out, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
