"""Export: ONNX deployments (plain, KV-cache, INT8) and compressed-tensors checkpoints; each exporter
validates what it wrote."""
