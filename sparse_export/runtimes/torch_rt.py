"""PyTorch eager: the reference the ONNX engines are checked against."""

import numpy as np

from ..errors import UserError

from .base import Runtime


class TorchRuntime(Runtime):
    name = "torch"
    package = "torch"

    def _load(self):
        from .. import models
        from ..export.graph import ExportModule, is_deployment, source_model

        spec = self.folder
        if is_deployment(self.folder):  # run the model the deployment was exported from
            spec = source_model(self.folder)
            if not spec:
                raise UserError(f"{self.folder} does not record the model it was exported from")
        model, _ = models.load_model(spec)
        self.module = ExportModule(model.float(), self.logits).eval()

    def run(self, input_ids, attention_mask):
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.asarray(input_ids, np.int64)),
                              torch.from_numpy(np.asarray(attention_mask, np.int64)))
        return out.float().numpy()
