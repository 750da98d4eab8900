"""DeepSparse (Neural Magic): compiles the graph for one fixed (batch, seqlen), skipping zero weights."""

import os
from pathlib import Path

import numpy as np

from ..errors import UserError

from .base import Runtime


def fixed_shape_copy(src, batch: int, seqlen: int, folder) -> Path:
    """Copy of the ONNX file with its inputs pinned to [batch, seqlen]; external data is linked, not copied.

    (DeepSparse's own input_shapes option rewrites the file in place, which would pin the deployment.)
    """
    import onnx

    src = Path(src)
    proto = onnx.load(str(src), load_external_data=False)
    for inp in proto.graph.input:
        dims = inp.type.tensor_type.shape.dim
        dims[0].dim_value, dims[1].dim_value = batch, seqlen
    dst = Path(folder) / src.name
    onnx.save_model(proto, str(dst))
    data = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    for loc in data:
        (Path(folder) / loc).symlink_to((src.parent / loc).resolve())
    return dst


def layer_profile(path, inputs: list[np.ndarray], threads: int | None = None, iterations: int = 20,
                  warmup: int = 3) -> str:
    """DeepSparse's per-operator time breakdown (text, from its debug analysis) of the fixed-shape
    graph at `path` run on `inputs` (a list of arrays in the graph's input order)."""
    os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
    from deepsparse.debug_analysis import construct_layer_statistics
    from deepsparse.engine import DebugAnalysisEngine

    engine = DebugAnalysisEngine(str(path), batch_size=1, num_cores=threads, num_iterations=iterations,
                                 num_warmup_iterations=warmup)
    return construct_layer_statistics(engine.analyze(inputs, val_inp=False))


def prefill_profile(folder, seqlen: int = 400, threads: int | None = None, iterations: int = 10,
                    warmup: int = 2, vocab: int = 49152) -> str:
    """layer_profile of one 1 x seqlen forward through the plain graph in deployment `folder` (random tokens)."""
    import tempfile

    from .. import data

    ids, mask = data.random_tokens(vocab, 1, seqlen)
    with tempfile.TemporaryDirectory() as tmp:
        path = fixed_shape_copy(Path(folder) / "model.onnx", 1, seqlen, tmp)
        return layer_profile(path, [ids, mask], threads, iterations, warmup)


def profile_entries(text: str) -> tuple[float, list[tuple[str, str | None, float]]]:
    """A layer_profile text as (summed total ms, [(operator group, kernel or None for the group line, ms)])."""
    import re

    entries, group = [], None
    for line in text.splitlines():
        m = re.match(r"(\s*)(\S.*?)\s*\|\s*([\d.]+)\s*\|", line)
        if not m:
            continue
        if not m.group(1):           # an operator group; its kernels are listed indented below it
            group = m.group(2)
        entries.append((group, m.group(2) if m.group(1) else None, float(m.group(3))))
    return float(re.search(r"Summed Total Time: ([\d.]+)", text).group(1)), entries


class DeepSparseRuntime(Runtime):
    name = "deepsparse"
    package = "deepsparse"

    def _load(self):
        os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")  # no network here
        import deepsparse

        path = fixed_shape_copy(self.onnx_file(), self.batch, self.seqlen, self.temp_dir())
        # num_cores None: all physical cores
        self.engine = deepsparse.compile_model(str(path), batch_size=self.batch, num_cores=self.threads)

    def run(self, input_ids, attention_mask):
        if tuple(input_ids.shape) != (self.batch, self.seqlen):
            raise UserError(f"deepsparse engine compiled for {self.batch}x{self.seqlen} tokens, "
                            f"got {input_ids.shape[0]}x{input_ids.shape[1]}")
        inputs = [np.ascontiguousarray(input_ids, np.int64), np.ascontiguousarray(attention_mask, np.int64)]
        return self.engine.run(inputs)[0]
