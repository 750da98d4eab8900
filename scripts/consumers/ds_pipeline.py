"""DeepSparse's own TextGeneration pipeline on a KV-cache deployment (run in DeepSparse's environment:
deepsparse[llm]==1.8.0, transformers 4.39, tokenizers 0.15). Only third-party code runs here.

usage: python ds_pipeline.py DEPLOY_DIR REFERENCE_JSON OUT_JSON
REFERENCE_JSON: {"prompt", "max_new_tokens", "prompt_ids", "new_ids"} from transformers in the project venv.
The pipeline rewrites model.onnx in place: pass a copy of the deployment.
"""

import json
import sys
import time

import deepsparse
import tokenizers
import transformers
from deepsparse import TextGeneration

folder, ref_path, out_path = sys.argv[1:4]
ref = json.loads(open(ref_path).read())
t0 = time.perf_counter()
pipe = TextGeneration(model_path=folder, internal_kv_cache=False,  # True: its compiler aborts (docs/interop.md)
                      sequence_length=ref.get("sequence_length", 1024))
load_s = time.perf_counter() - t0
prompt_ids = pipe.tokenizer(ref["prompt"]).input_ids
out = pipe(prompt=ref["prompt"], max_new_tokens=ref["max_new_tokens"], do_sample=False,
           include_prompt_logits=False, output_scores=False)
text = out.generations[0].text
# the pipeline returns text: re-encode it (DeepSparse 1.8 returns one token more than max_new_tokens:
# the prefill's token is not counted), and compare the first max_new_tokens with transformers'
new_ids = pipe.tokenizer(text, add_special_tokens=False).input_ids
ref_text = pipe.tokenizer.decode(ref["new_ids"], skip_special_tokens=True)
n = len(ref["new_ids"])
result = {
    "versions": {"deepsparse": deepsparse.__version__, "transformers": transformers.__version__,
                 "tokenizers": tokenizers.__version__},
    "load_s": load_s, "prompt_ids_equal": prompt_ids == ref["prompt_ids"],
    "text": text, "reference_text": ref_text, "returned_tokens": len(new_ids), "new_tokens": n,
    "first_tokens_equal": new_ids[:n] == ref["new_ids"], "text_starts_with_reference": text.startswith(ref_text),
}
result["pass"] = bool(result["prompt_ids_equal"] and result["first_tokens_equal"]
                      and result["text_starts_with_reference"])
open(out_path, "w").write(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
