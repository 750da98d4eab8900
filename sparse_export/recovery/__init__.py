"""Recovery after a one-shot prune: distillation of the whole pruned model from the dense one with the
mask fixed (distill.py, jobs.py)."""
