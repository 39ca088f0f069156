"""OpenVINO CPU backend, reading the same ONNX bundle.

Precisions:
* ``fp32`` — the ONNX graph as is;
* ``bf16`` — the fp32 graph with ``INFERENCE_PRECISION_HINT=bf16`` (CPUs with AVX-512 BF16 or
  AMX); its drift against fp32 is gated at export time (``variants.openvino-bf16``);
* ``int8`` — the NNCF post-training-quantized IR written by ``rerankd export --openvino``
  (``variants.openvino-int8``), run with bf16 for the remaining float ops where the CPU has it
  (the precision it was gated at, recorded in the manifest).

Shapes: the batcher pads every batch to a (batch, length) bucket and runs each bucket once before
SERVING, so the backend only ever sees a small, known set of shapes. How they are compiled is
``--openvino-compile``:

* ``shared`` (default): one compiled model with dynamic input shapes serves every bucket; the CPU
  plugin keeps its shape-specialized kernels in its own cache, filled by the warmup.
* ``per-shape``: one compiled model per bucket (a fully static graph). Measured here
  (MiniLM-L6 reranker, int8, 2 cores): ~90 MB of resident memory per compiled bucket (weights are
  repacked per compiled model) — 30 buckets x 2 models = 5.4 GiB for the default bucket set,
  against ~0.36 GiB for a shared model that has run every bucket — for ~8 % lower latency per
  batch (541 vs 579 ms for a 50x256 rerank, back to back; see README, "Memory").
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


def has_int8_dot() -> bool:
    """An int8 dot-product instruction (VNNI or AMX): where int8 pays off. Without one (plain
    AVX2), the NNCF int8 reranker ran 50x256 pairs in 3.8 s against fp32's 2.7 s on a 2-core
    AMD EPYC (README, "Precision on CPUs without VNNI"), so ``--precision auto`` skips it there."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


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
        if options.openvino_compile not in ("shared", "per-shape"):
            raise ConfigError(f"openvino_compile must be shared or per-shape, got {options.openvino_compile!r}")
        self.compile_mode = options.openvino_compile
        self._compiled: dict[tuple[int, int], ov.CompiledModel] = {}
        self._requests: dict[tuple[int, int], ov.InferRequest] = {}
        self._lock = threading.Lock()
        self._shared: ov.CompiledModel | None = None
        if self.compile_mode == "shared":
            model = self._model.clone()
            model.reshape({name: ov.PartialShape([-1, -1]) for name in self._inputs})
            self._shared = self._core.compile_model(model, "CPU", self._config)

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
                    if self._shared is not None:
                        # One infer request per shape on the shared model: requests keep their
                        # own shape-sized buffers, so alternating buckets do not reallocate.
                        compiled = self._shared
                    else:
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
