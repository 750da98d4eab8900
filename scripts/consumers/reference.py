"""The reference for the consumer checks: transformers' own greedy generate on a model folder, run in the
project venv (transformers 5). No sparse-export code runs here.

usage: python reference.py MODEL_DIR PROMPT NEW_TOKENS OUT_JSON [SEQUENCE_LENGTH [force]]
force: min_new_tokens = NEW_TOKENS (no stop at end-of-sequence: a weak model may stop at once).
PROMPT "chat:TEXT" wraps TEXT in the folder's chat template.
"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompt, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
seq = int(sys.argv[5]) if len(sys.argv) > 5 else 1024
min_new = n if len(sys.argv) > 6 and sys.argv[6] == "force" else 0
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
if prompt.startswith("chat:"):
    prompt = tok.apply_chat_template([{"role": "user", "content": prompt[5:]}], add_generation_prompt=True, tokenize=False)
ids = tok(prompt, return_tensors="pt").input_ids
g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=min_new, do_sample=False, pad_token_id=tok.eos_token_id)
new = g[0, ids.shape[1]:].tolist()
json.dump({"prompt": prompt, "max_new_tokens": n, "prompt_ids": ids[0].tolist(), "new_ids": new,
           "text": tok.decode(new, skip_special_tokens=True),
           "sequence_length": seq, "min_new_tokens": min_new}, open(out, "w"))
print(tok.decode(new))
