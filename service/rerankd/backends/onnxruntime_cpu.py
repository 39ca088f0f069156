"""ONNX Runtime CPU backend (fp32 or the export-time int8 variant)."""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from ..bundle import ModelBundle
from ..errors import BackendError
from . import BackendOptions


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, bundle: ModelBundle, options: BackendOptions) -> None:
        self.precision = options.precision
        path = bundle.variant_file(options.precision)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = options.threads or (os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._output = self._session.get_outputs()[0].name

    def static_shapes(self) -> bool:
        return False

    def health(self) -> None:
        if self._session is None:
            raise BackendError("onnxruntime session closed")

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        try:
            return self._session.run([self._output], {k: feeds[k] for k in self._inputs})[0]
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendError(f"onnxruntime failed on a batch of shape {input_ids.shape}: {e}") from e
