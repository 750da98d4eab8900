"""llama.cpp rows for bench_sparse_decode.py.

llama.cpp runs GGUF files, and llama-cpp-python lives in its own venv (it wants numpy 2; this project pins
numpy 1.26 for DeepSparse). So:
  write_gguf   (this venv, the `gguf` package) a Llama-family safetensors folder -> an F16 GGUF, one tensor
               at a time; the tokenizer metadata is SmolLM2's (from the demo GGUF; the random-weight shapes
               use SmolLM2's tokenizer too), padded with unused tokens up to the model's vocabulary;
  quantize     (llama.cpp's own llama_model_quantize, in the other venv) F16 -> Q8_0 / Q4_0;
  decode       (the other venv) greedy decoding of random prompt ids, timed per step.
llama.cpp has no sparse kernels: its speed depends on the shapes and the quantization type, not on the
values, so the dense model stands for every sparsity.
"""

import json
import subprocess
from pathlib import Path

import numpy as np

from sparse_export import models

# HF Llama name -> GGUF name (per layer: blk.N.)
LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def _gguf_name(name):
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    parts = name.split(".")          # model.layers.N.<module...>.weight
    return f"blk.{parts[2]}.{LAYER_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


def _rope_permute(w, heads):
    """llama.cpp's rotary layout for q/k rows (the inverse of what transformers undoes on loading a GGUF)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(folder, out) -> Path:
    """An F16 GGUF of a Llama-family safetensors folder (kept when it exists)."""
    import gguf
    from safetensors import safe_open

    out = Path(out)
    if out.exists():
        return out
    cfg = models.read_config(folder)
    if cfg.get("model_type") != "llama":
        raise SystemExit(f"llama.cpp rows: {folder} is {cfg.get('model_type')}, only llama folders are converted")
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    files = sorted(Path(folder).glob("*.safetensors"))
    where = {}
    for f in files:
        with safe_open(f, "pt") as sf:
            where.update({k: f for k in sf.keys()})
    names = [n for n in where if n.endswith(".weight") and "rotary" not in n]
    if cfg.get("tie_word_embeddings") and "lm_head.weight" in names:
        names.remove("lm_head.weight")
    w = gguf.GGUFWriter(str(out) + ".tmp", "llama")
    w.add_name(Path(folder).name)
    w.add_context_length(cfg.get("max_position_embeddings", 8192))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(cfg["hidden_size"] // heads)
    w.add_rope_freq_base(float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e4)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    _add_tokenizer(w, cfg["vocab_size"])
    shapes = {}
    for n in names:
        with safe_open(where[n], "pt") as sf:
            shapes[n] = tuple(sf.get_slice(n).get_shape())
        dtype = np.float16 if len(shapes[n]) == 2 else np.float32
        w.add_tensor_info(_gguf_name(n), shapes[n], np.dtype(dtype), int(np.prod(shapes[n])) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for n in names:
        with safe_open(where[n], "pt") as sf:
            t = sf.get_tensor(n).float().numpy()
        if n.endswith("q_proj.weight"):
            t = _rope_permute(t, heads)
        elif n.endswith("k_proj.weight"):
            t = _rope_permute(t, kv)
        w.write_tensor_data(t.astype(np.float16 if t.ndim == 2 else np.float32))
    w.close()
    Path(str(out) + ".tmp").rename(out)
    return out


def _add_tokenizer(w, vocab_size):
    from gguf import GGUFReader

    r = GGUFReader(str(models.demo_gguf_path()))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    if vocab_size < len(tokens):
        raise SystemExit(f"llama.cpp rows: a vocabulary of {vocab_size} is smaller than SmolLM2's tokenizer")
    pad = vocab_size - len(tokens)
    w.add_tokenizer_model(r.fields["tokenizer.ggml.model"].contents())
    w.add_tokenizer_pre(r.fields["tokenizer.ggml.pre"].contents())
    w.add_token_list(tokens + [f"<unused{i}>" for i in range(pad)])
    w.add_token_types(types + [5] * pad)      # 5: unused
    w.add_token_merges(r.fields["tokenizer.ggml.merges"].contents())
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def quantize(python, f16, out, qtype) -> Path:
    """llama.cpp's quantizer (in the llama-cpp-python venv) on an F16 GGUF; kept when it exists."""
    out = Path(out)
    if not out.exists():
        code = (f"import llama_cpp as L, ctypes\np = L.llama_model_quantize_default_params()\n"
                f"p.ftype = L.LLAMA_FTYPE_MOSTLY_{qtype}\n"
                f"rc = L.llama_model_quantize({str(f16).encode()!r}, {(str(out) + '.tmp').encode()!r}, ctypes.byref(p))\n"
                f"raise SystemExit(rc)\n")
        subprocess.run([python, "-c", code], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        Path(str(out) + ".tmp").rename(out)
    return out


def read_bytes_per_token(path) -> int:
    """Bytes of the tensors one decode step reads: every matrix except the token embedding (one row of it)."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    total = 0
    for t in r.tensors:
        if t.name == "token_embd.weight":
            total += int(t.n_bytes) // int(t.shape[-1])
            if not any(x.name == "output.weight" for x in r.tensors):
                total += int(t.n_bytes)            # tied: the embedding is the LM head too
        else:
            total += int(t.n_bytes)
    return total


RUNNER = r'''
import json, re, sys, time
import numpy as np
import llama_cpp
path, threads, prompt_tokens, new_tokens, rounds = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:6])
llm = llama_cpp.Llama(model_path=path, n_ctx=prompt_tokens + new_tokens + 8, n_batch=512, n_threads=threads,
                      n_threads_batch=threads, verbose=False)
n_vocab = llm.n_vocab()
prompt = np.random.default_rng(0).integers(10, n_vocab, prompt_tokens).tolist()
def last():
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))
steps, ttft, cpu = [], [], []
for r in range(rounds + 1):
    llm.reset()
    t = time.perf_counter(); llm.eval(prompt); first = time.perf_counter() - t
    tok, c0, mine = last(), time.process_time(), []
    for _ in range(new_tokens - 1):
        t = time.perf_counter(); llm.eval([tok]); mine.append(time.perf_counter() - t); tok = last()
    if r:   # the first round warms up
        steps += mine; ttft.append(first); cpu.append((time.process_time() - c0) / len(mine))
print(json.dumps({"ms_token": 1e3 * float(np.median(steps)), "p90_ms": 1e3 * float(np.percentile(steps, 90)),
                  "min_ms": 1e3 * min(steps), "ttft_ms": 1e3 * float(np.median(ttft)),
                  "cpu_ms_token": 1e3 * float(np.median(cpu)), "llama_cpp_python": llama_cpp.__version__,
                  # VmHWM: ru_maxrss would report the (larger) parent's peak across fork + exec
                  "peak_rss_gib": int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read())[1]) / 2**20}))
'''


def decode(python, gguf_path, threads, prompt_tokens, new_tokens, rounds) -> dict:
    """Greedy decoding timed in the llama-cpp-python venv: ms/token (median step), TTFT, CPU ms/token."""
    proc = subprocess.run([python, "-c", RUNNER, str(gguf_path), str(threads), str(prompt_tokens), str(new_tokens),
                           str(rounds)], check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])
