"""Recovery after a one-shot prune, every pruned weight held at exactly zero: block-wise reconstruction
inside the layer-by-layer prune (blockwise.py, masks.py) and distillation of the whole pruned model from the
dense one (distill.py, jobs.py)."""
