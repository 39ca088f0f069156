"""OpenVINO CPU backend, reading the same ONNX bundle.

Precisions:
* ``fp32`` — the ONNX graph as is;
* ``bf16`` — the fp32 graph with ``INFERENCE_PRECISION_HINT=bf16`` (CPUs with AVX-512 BF16 or
  AMX); its drift against fp32 is gated at export time (``variants.openvino-bf16``);
* ``int8`` — the NNCF post-training-quantized IR written by ``rerankd export --openvino``
  (``variants.openvino-int8``), run with bf16 for the remaining float ops where the CPU has it
  (the precision it was gated at, recorded in the manifest).

Shapes are static: each (batch, length) bucket is reshaped and compiled once (the batcher warms
them all before SERVING); a static graph lets OpenVINO pick its fastest kernels.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import openvino as ov

from ..bundle import ModelBundle
from ..errors import BackendError, ConfigError
from . import BackendOptions

_VARIANT = {"fp32": "fp32", "bf16": "fp32", "int8": "openvino-int8"}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_bf16() -> bool:
    flags = cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags)


class OpenVinoBackend:
    name = "openvino"

    def __init__(self, bundle: ModelBundle, options: BackendOptions) -> None:
        if options.precision not in _VARIANT:
            raise ConfigError(f"openvino backend: precision must be one of {', '.join(_VARIANT)}, got {options.precision!r}")
        self.precision = options.precision
        if options.precision == "bf16":
            if not has_bf16():
                raise ConfigError("openvino bf16 needs a CPU with AVX-512 BF16 or AMX; use --precision fp32 or int8")
            if "openvino-bf16" not in bundle.manifest.get("variants", {}):
                raise ConfigError(f"bundle {bundle.name!r} has no gated openvino-bf16 variant; re-export with `rerankd export --openvino`")
        variant = _VARIANT[options.precision]
        path = bundle.variant_file(variant)
        hint = "bf16" if options.precision == "bf16" else "f32"
        if options.precision == "int8":
            hint = bundle.manifest["variants"][variant].get("inference_precision", "f32")
            if hint == "bf16" and not has_bf16():
                hint = "f32"
        self._core = ov.Core()
        self._model = self._core.read_model(str(path))
        threads = options.threads or (os.cpu_count() or 1)
        self._config = {
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "INFERENCE_PRECISION_HINT": hint,
        }
        self._inputs = [i.get_any_name() for i in self._model.inputs]
        self._compiled: dict[tuple[int, int], ov.CompiledModel] = {}
        self._requests: dict[tuple[int, int], ov.InferRequest] = {}
        self._lock = threading.Lock()

    def static_shapes(self) -> bool:
        return True

    def health(self) -> None:
        if self._model is None:
            raise BackendError("openvino model not loaded")

    def _request(self, shape: tuple[int, int]) -> ov.InferRequest:
        req = self._requests.get(shape)
        if req is None:
            with self._lock:
                req = self._requests.get(shape)
                if req is None:
                    model = self._model.clone()
                    model.reshape({name: ov.PartialShape(list(shape)) for name in self._inputs})
                    compiled = self._core.compile_model(model, "CPU", self._config)
                    self._compiled[shape] = compiled
                    req = compiled.create_infer_request()
                    self._requests[shape] = req
        return req

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        try:
            req = self._request(tuple(input_ids.shape))
            req.infer({k: feeds[k] for k in self._inputs})
            return np.array(req.get_output_tensor(0).data, copy=True)
        except Exception as e:
            raise BackendError(f"openvino failed on a batch of shape {input_ids.shape}: {e}") from e
