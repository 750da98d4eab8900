"""Load a compressed-tensors folder with transformers' own from_pretrained (run in a throwaway venv:
transformers 4.57 + compressed-tensors 0.14.0.1, or transformers 5 + compressed-tensors >= 0.15 to show
the silent failure there). Only third-party code runs here.

usage: python ct_load.py COMPRESSED_DIR PRUNED_DIR REFERENCE_JSON OUT_JSON [float32|default]
Compares every tensor with the pruned folder's safetensors (bit for bit) and greedy tokens with the
reference computed by transformers 5 in the project venv.
"""

import glob
import json
import sys

import compressed_tensors
import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, pruned, ref_path, out_path = sys.argv[1:5]
dtype = sys.argv[5] if len(sys.argv) > 5 else "float32"
ref = json.loads(open(ref_path).read())
expected = {}
for f in sorted(glob.glob(f"{pruned}/*.safetensors")):
    expected.update(load_file(f))
result = {"versions": {"transformers": transformers.__version__, "compressed-tensors": compressed_tensors.__version__,
                       "torch": torch.__version__}, "dtype": dtype}
try:
    kw = {"torch_dtype": torch.float32} if dtype == "float32" else {}
    if dtype == "float32" and int(transformers.__version__.split(".")[0]) >= 5:
        kw = {"dtype": torch.float32}
    model = AutoModelForCausalLM.from_pretrained(folder, **kw).eval()
except Exception as e:  # noqa: BLE001 - the outcome is what we report
    result.update(loaded=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", pass_=False)
else:
    sd = model.state_dict()
    same = [k for k, v in expected.items() if k in sd and sd[k].dtype == v.dtype and torch.equal(
        sd[k].contiguous().view(torch.uint8), v.contiguous().view(torch.uint8))]
    tok = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tok(ref["prompt"]).input_ids])
    with torch.no_grad():
        g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=ref["max_new_tokens"],
                           min_new_tokens=ref.get("min_new_tokens", 0),
                           do_sample=False, pad_token_id=tok.eos_token_id)
    new = g[0, ids.shape[1]:].tolist()
    result.update(loaded=True, tensors=len(expected), bit_identical=len(same),
                  rope_theta=getattr(model.config, "rope_theta", None) or model.config.rope_parameters["rope_theta"],
                  tokenizer_class=type(tok).__name__, prompt_ids_equal=ids[0].tolist() == ref["prompt_ids"],
                  greedy_equal=new == ref["new_ids"])
    result["pass_"] = len(same) == len(expected) and result["prompt_ids_equal"] and result["greedy_equal"]
result["pass"] = result.pop("pass_")
open(out_path, "w").write(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
