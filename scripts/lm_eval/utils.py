"""Helpers for wikitext2_local.yaml: the raw file's lines grouped into articles."""

import re

TITLE = re.compile(r"^ = [^=].* = \n?$")  # " = Title = " starts an article; " = = Section = = " does not


def articles(dataset):
    """One row per article: the lines from one top-level title to the next, joined as in the file."""
    docs, current = [], []
    for line in dataset["text"]:
        if TITLE.match(line) and any(x.strip() for x in current):
            docs.append("".join(current))
            current = []
        current.append(line)
    if any(x.strip() for x in current):
        docs.append("".join(current))
    return dataset.from_dict({"text": docs})
