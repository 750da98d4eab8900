"""The interface of an engine adapter: load a folder, run a batch, say its name and version."""

import importlib.metadata
import tempfile
from pathlib import Path

from ..errors import UserError
from ..outputs import Timer, read_meta


class Runtime:
    """Loads a deployment folder (model.onnx) or a model folder; `run` returns the output as numpy.

    batch, seqlen: the input shape (engines that compile for fixed shapes use it).
    threads:       worker threads (None: the engine's default, all cores).
    logits:        the variant a model folder is exported or wrapped as ('last' | 'all' | 'none');
                   a deployment folder's own variant wins.
    load_s:        seconds the load took (for DeepSparse, mostly compilation).
    """

    name = "base"
    package = None  # the distribution whose version is reported

    def __init__(self, folder, batch=1, seqlen=128, threads=None, logits="last"):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise UserError(f"folder not found: {folder}")
        self.batch, self.seqlen, self.threads = batch, seqlen, threads
        self.meta = read_meta(self.folder)
        self.logits = self.meta.get("logits", logits) if self.meta.get("kind") == "deployment" else logits
        self._tmp = None
        with Timer() as t:
            self._load()
        self.load_s = t.wall

    @property
    def version(self):
        return importlib.metadata.version(self.package)

    def _load(self):
        raise NotImplementedError

    def run(self, input_ids, attention_mask):
        """int64 arrays [batch, seqlen] -> the graph's output as a float32 numpy array."""
        raise NotImplementedError

    def temp_dir(self):
        """A scratch folder that lives as long as this adapter."""
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=f"sparse-export-{self.name}-")
        return Path(self._tmp.name)

    def onnx_file(self):
        """model.onnx of a deployment folder; a model folder is exported to a scratch folder first."""
        from ..export.graph import ONNX_FILE, is_deployment
        from ..export.onnx_plain import export_onnx

        if is_deployment(self.folder):
            return self.folder / ONNX_FILE
        out = self.temp_dir() / "deployment"
        export_onnx(self.folder, out, logits=self.logits, log=lambda *_: None)
        return out / ONNX_FILE

    def close(self):
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
