"""Files every output folder carries in a form that both transformers 5 and the older generation read
(transformers 4.x with tokenizers 0.15: the environment of DeepSparse 1.8, vLLM <= 0.18 and
compressed-tensors 0.14).

transformers 5 writes three things the older readers get wrong:
  tokenizer_config.json  "tokenizer_class": "TokenizersBackend", a class transformers 4 lacks; a list
                         under "extra_special_tokens" (transformers 4.5x expects a dict there); the chat
                         template only in chat_template.jinja (transformers < 4.43 reads the config key)
  tokenizer.json         BPE merges as ["a", "b"] pairs; tokenizers < 0.20 parses only "a b" strings
  config.json            only "rope_parameters": transformers 4 then uses its default rope theta
                         (10000; SmolLM2 needs 100000) without a word
portable_folder() rewrites them in place, adding the old form beside the new where both can live:
PreTrainedTokenizerFast (the same class as TokenizersBackend in transformers 5, and in transformers 4
the class that takes tokenizer.json as it is), "a b" merges, and rope_theta / rope_scaling next to
rope_parameters. transformers 5 reads the rewritten files into the same tokenizer and config
(tests/export/test_compat.py); scripts/check_consumers.sh runs the old readers on them.
"""

import json
from pathlib import Path

from .errors import UserError

TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # exists in transformers 4 and 5, reads tokenizer.json as is
V5_ONLY_CLASSES = ("TokenizersBackend",)


def legacy_config(cfg: dict) -> dict:
    """config.json with rope_theta and rope_scaling derived from a flat rope_parameters (else unchanged).

    transformers 5 takes a non-null rope_scaling as its rope_parameters, so rope_scaling is written as
    the whole dict (plus the old "type" key); a default rope gets rope_scaling null.
    """
    rope = cfg.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_theta" not in rope or any(isinstance(v, dict) for v in rope.values()):
        return cfg  # absent, or nested per layer type (no single legacy form)
    out = dict(cfg)
    out["rope_theta"] = rope["rope_theta"]
    kind = rope.get("rope_type", rope.get("type", "default"))
    out["rope_scaling"] = None if kind == "default" else {**rope, "rope_type": kind, "type": kind}
    return out


def legacy_tokenizer_config(tc: dict) -> dict:
    """tokenizer_config.json with a tokenizer class and special-token keys both generations read."""
    out = dict(tc)
    if out.get("tokenizer_class") in V5_ONLY_CLASSES or out.get("backend") == "tokenizers":
        out["tokenizer_class"] = TOKENIZER_CLASS
    extra = out.get("extra_special_tokens")
    if isinstance(extra, list):  # transformers 5's list form; transformers 4 knows the old key
        out.pop("extra_special_tokens")
        old = list(out.get("additional_special_tokens") or [])
        out["additional_special_tokens"] = old + [t for t in extra if t not in old]
    for key in ("is_local", "local_files_only"):  # loading state written back by transformers 5
        out.pop(key, None)
    return out


def legacy_tokenizer_json(tj: dict) -> dict:
    """tokenizer.json with BPE merges as "a b" strings (tokenizers 0.15 reads no other form).

    UserError when a merge holds a space itself: the string form cannot express it.
    """
    model = tj.get("model") or {}
    merges = model.get("merges")
    if model.get("type") != "BPE" or not merges or isinstance(merges[0], str):
        return tj
    bad = next((m for m in merges if len(m) != 2 or " " in m[0] or " " in m[1]), None)
    if bad is not None:
        raise UserError(f"tokenizer.json: merge {bad!r} has no 'a b' form that tokenizers 0.15 reads")
    return {**tj, "model": {**model, "merges": [f"{a} {b}" for a, b in merges]}}


def _rewrite(path: Path, fix) -> bool:
    if not path.is_file():
        return False
    old = json.loads(path.read_text(encoding="utf-8"))
    new = fix(old)
    if new == old:
        return False
    path.write_text(json.dumps(new, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return True


def _with_chat_template(folder: Path):
    jinja = folder / "chat_template.jinja"

    def fix(tc: dict) -> dict:
        out = legacy_tokenizer_config(tc)
        if jinja.is_file() and "chat_template" not in out:
            out["chat_template"] = jinja.read_text(encoding="utf-8")
        return out
    return fix


def portable_folder(folder) -> list[str]:
    """Rewrite a saved folder's config.json, tokenizer_config.json and tokenizer.json (those present) in
    the form both transformers generations read. Returns the names of the files changed."""
    folder = Path(folder)
    fixes = {"config.json": legacy_config, "tokenizer_config.json": _with_chat_template(folder),
             "tokenizer.json": legacy_tokenizer_json}
    return [name for name, fix in fixes.items() if _rewrite(folder / name, fix)]
