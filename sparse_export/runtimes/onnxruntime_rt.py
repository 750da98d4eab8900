"""ONNX Runtime (CPU execution provider)."""

import numpy as np

from .base import Runtime


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    package = "onnxruntime"

    def _load(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only
        if self.threads:
            opts.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(str(self.onnx_file()), opts, providers=["CPUExecutionProvider"])

    def run(self, input_ids, attention_mask):
        feed = {"input_ids": np.asarray(input_ids, np.int64), "attention_mask": np.asarray(attention_mask, np.int64)}
        return self.session.run(None, feed)[0]
