"""sparse-cpu: our own int8 decode runtime for pruned model folders (bitmask-packed weights, AVX-512 kernel)."""
