"""INT8 calibration one decoder layer at a time: what onnx_int8.prepare_int8 does for a model in memory,
done layer by layer from the shards for the streamed export.

For each layer, as it is read: its Linear weights are put on their int8 grid (the recorded scales of a
--wbits 8 folder, checked; otherwise rounded to nearest per output row), then the calibration windows'
hidden states run through it with int8_calib.activation_ranges measuring the inputs of its Linear
modules (and recording_attention the query and key of its attention), and its outputs become the next
layer's inputs. The windows are split into the same batches as the in-memory pass, each layer runs
the same code on the same inputs, so the ranges are the in-memory ones. After the last layer, the LM
head's input (the final norm of the last layer's outputs) is measured the same way (head()).
"""

import torch

from .. import models
from ..layerwise import capture_first_layer_inputs, layer_out
from ..pruning.grid import check_int8_grid, grid_tolerance, int_weight, recorded_scales, round_weights
from .int8_calib import act_qparams, activation_ranges, attention_qparams, grid_head, head_choice
from .int8_calib import recording_attention
from .int8_calib import outlier_ratio as quant_outlier_ratio

CALIB_BATCH = 4   # windows per forward (prepare_int8's batch)


class _OneLayer:
    """What activation_ranges needs of a model, for one decoder layer: get_submodule, and a call that
    runs the layer on the stored hidden states of the windows whose indices it is given as input_ids
    (keeping the outputs for the next layer)."""

    def __init__(self, model, layer, inputs: list, kwargs: list, batch: int):
        self.model, self.layer, self.inputs, self.kwargs, self.batch = model, layer, inputs, kwargs, batch
        self.outputs = [None] * len(inputs)

    def get_submodule(self, name):
        return self.model.get_submodule(name)

    def __call__(self, input_ids, **_):
        c = int(input_ids[0, 0]) // self.batch
        self.outputs[c] = layer_out(self.layer(self.inputs[c], **self.kwargs[c]))


class _Head:
    """What activation_ranges needs of a model for the part after the layers: get_submodule, and a call that
    runs `run_head` (the model's own code after its decoder layers) on the stored last-layer outputs of
    the windows whose indices it is given as input_ids."""

    def __init__(self, model, run_head, inputs: list, batch: int):
        self.model, self.run_head, self.inputs, self.batch = model, run_head, inputs, batch

    def get_submodule(self, name):
        return self.model.get_submodule(name)

    def __call__(self, input_ids, **_):
        self.run_head(self.inputs[int(input_ids[0, 0]) // self.batch])


class LayerCalibration:
    """Activation ranges of a model read one layer at a time. Call capture() with the tensors before the
    first layer loaded, then layer(i) with layer i loaded (in order)."""

    def __init__(self, model, windows: torch.Tensor, meta: dict, stored_dtype: torch.dtype,
                 percentile: float | None, outlier_ratio: float | None, attention: bool):
        self.model, self.windows, self.percentile, self.outlier_ratio = model, windows, percentile, outlier_ratio
        self.attention = attention and bool(models.attention_names(model))
        check_int8_grid(meta)
        self.recorded = recorded_scales(meta, models.prunable_names(model))
        self.tol = grid_tolerance(stored_dtype)
        self.inputs, self.kwargs = [], []
        self.counts = {"recorded": 0, "rounded": 0}

    def capture(self) -> None:
        """Hidden states entering layer 0 (and its keyword arguments), in the attention mode calibration runs in."""
        with recording_attention(self.model, self.attention):
            self.inputs, self.kwargs = capture_first_layer_inputs(self.model, self.windows, CALIB_BATCH)

    def _grid(self, names: list[str]) -> dict:
        """Put the Linear weights `names` on their int8 grid in place; {name: scale per row}."""
        scales = {}
        with torch.no_grad():
            for n in names:
                if n in self.recorded:
                    mod = self.model.get_submodule(n)
                    ints = int_weight(models.weight_2d(mod), self.recorded[n], tol=self.tol, name=n)
                    models.set_weight_2d(mod, ints.float() * torch.tensor(self.recorded[n]).reshape(-1, 1))
                    scales[n] = self.recorded[n]
        rest = [n for n in names if n not in scales]
        scales.update(round_weights(self.model, 8, True, rest))
        self.counts["recorded"] += len(names) - len(rest)
        self.counts["rounded"] += len(rest)
        return scales

    def layer(self, i: int, names: list[str], attention_names: list[str]) -> tuple[dict, dict, dict, list]:
        """Grid and calibrate layer i (loaded, float32): (weight scales, Linear qparams, attention qparams,
        Linear modules left fp32) for its modules; its outputs become the next layer's inputs."""
        scales = self._grid(names)
        layer = models.decoder_layers(self.model)[i]
        run = _OneLayer(self.model, layer, self.inputs, self.kwargs, CALIB_BATCH)
        index = torch.arange(self.windows.shape[0]).reshape(-1, 1)
        with recording_attention(self.model, self.attention) as attn_ranges:
            ranges = activation_ranges(run, index, names, batch=CALIB_BATCH, percentile=self.percentile or 99.99)
        self.inputs = run.outputs
        fp32 = [n for n in names if self.outlier_ratio and quant_outlier_ratio(ranges[n]) > self.outlier_ratio]
        lo, hi = ("lo", "hi") if self.percentile else ("min", "max")
        qparams = {n: act_qparams(ranges[n][lo], ranges[n][hi]) for n in names if n not in fp32}
        attn = attention_qparams({n: attn_ranges[n] for n in attention_names}) if self.attention else {}
        return {n: scales[n] for n in qparams}, qparams, attn, fp32

    def head(self, name: str | None, run_head, tied: bool, requested: bool) -> tuple[dict, dict, dict]:
        """After the last layer: the LM head's input range (run_head(hidden) runs the model's own norm and
        head on the last layer's outputs), the int8-or-fp32 choice (as prepare_int8 makes it) and, when
        int8, the head's weight put on its per-row grid in place (untied). Returns (weight scales, qparams,
        the metadata's head entry); the first two are empty when the head stays fp32."""
        if name is None or not requested:
            return {}, {}, head_choice(name, None, None, tied, requested=False)
        run = _Head(self.model, run_head, self.inputs, CALIB_BATCH)
        index = torch.arange(self.windows.shape[0]).reshape(-1, 1)
        ranges = activation_ranges(run, index, [name], batch=CALIB_BATCH, percentile=self.percentile or 99.99)
        choice = head_choice(name, ranges[name], self.outlier_ratio, tied)
        if choice["dtype"] != "int8":
            return {}, {}, choice
        lo, hi = ("lo", "hi") if self.percentile else ("min", "max")
        qparams = {name: act_qparams(ranges[name][lo], ranges[name][hi])}
        return {name: grid_head(self.model, name)}, qparams, choice

    def weight_source(self) -> str:
        """"recorded", "round-to-nearest" or "mixed" (as prepare_int8 reports it)."""
        if not self.counts["rounded"]:
            return "recorded"
        return "round-to-nearest" if not self.counts["recorded"] else "mixed"
