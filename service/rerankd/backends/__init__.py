"""Inference backends: one small protocol, one registry.

A backend runs one padded batch of token ids through one exported model and returns the raw
output array. It knows nothing about stages, batching policy or gRPC. Adding a backend is one
file plus one entry in ``REGISTRY``; optional dependencies are imported lazily so that a missing
one fails with its install command.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from ..bundle import ModelBundle
from ..errors import ConfigError

log = logging.getLogger("rerankd.backends")


@dataclass(frozen=True, kw_only=True)
class BackendOptions:
    precision: str = "fp32"
    threads: int = 0
    # OpenVINO: "shared" = one compiled model for every bucket shape; "per-shape" = one compiled
    # model per (batch, length) bucket (see openvino_cpu.py for the measured trade-off).
    openvino_compile: str = "shared"
    # GPU (backend "cuda"): which CUDA device, which ONNX Runtime provider (auto | tensorrt | cuda),
    # where TensorRT caches its engines (the service passes <data-dir>/tensorrt-cache; "" =
    # <bundle>/.tensorrt-cache), and the largest batch bucket (the top of the TensorRT profile).
    device_id: int = 0
    gpu_provider: str = "auto"
    tensorrt_cache_dir: str = ""
    max_batch: int = 32

    @classmethod
    def from_settings(cls, settings, precision: str) -> "BackendOptions":
        """The options of one model's backend under the service ``Settings``."""
        from pathlib import Path

        m = settings.model
        return cls(precision=precision, threads=m.threads, openvino_compile=m.openvino_compile,
                   device_id=m.device_id, gpu_provider=m.gpu_provider, max_batch=max(settings.batch.batch_sizes),
                   tensorrt_cache_dir=str(m.tensorrt_cache_dir or Path(settings.index.data_dir) / "tensorrt-cache"))


@runtime_checkable
class Backend(Protocol):
    name: str
    precision: str

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        """Run one padded batch ([B, T] int64 each); returns the model's first output."""
        ...

    def static_shapes(self) -> bool:
        """True when every new (batch, length) shape costs a compile (warm all buckets)."""
        ...

    def health(self) -> None:
        """Raise if the backend cannot serve."""
        ...


# name -> (module, class, the command that installs what it needs; README "GPU" for cuda)
REGISTRY: dict[str, tuple[str, str, str]] = {
    "onnxruntime": ("rerankd.backends.onnxruntime_cpu", "OnnxRuntimeBackend", "pip install onnxruntime"),
    "openvino": ("rerankd.backends.openvino_cpu", "OpenVinoBackend", "pip install openvino"),
    "cuda": ("rerankd.backends.onnxruntime_gpu", "OnnxRuntimeGpuBackend",
             "pip uninstall -y onnxruntime && pip install 'onnxruntime-gpu[cuda,cudnn]==1.31.1'"),
}


# ``--backend auto --precision auto``: the fastest gated variant this machine and bundle support,
# in this order (CPU rows measured on a 2-core AVX-512 BF16 CPU, see README "Performance"; on a
# CPU without an int8 dot-product instruction (VNNI/AMX) int8 is slower than fp32 and is skipped,
# measured on a 2-core AVX2 EPYC; OpenVINO fp32 beat onnxruntime fp32 on both CPUs; a GPU,
# when onnxruntime-gpu and a CUDA device are present, beats any CPU variant by two orders of
# magnitude for these models: MiniLM-L6 50x256 took 2.5-4 ms on an H100 against ~550 ms here).
AUTO_ORDER: tuple[tuple[str, str, str], ...] = (
    ("cuda", "fp16", "fp16"),
    ("cuda", "fp32", "fp32"),
    ("openvino", "int8", "openvino-int8"),
    ("openvino", "bf16", "openvino-bf16"),
    ("openvino", "fp32", "fp32"),
    ("onnxruntime", "fp32", "fp32"),
    # Dynamic int8: activation scales are computed per batch, so a pair's score depends slightly on
    # what shares its batch; only used when asked for explicitly (--precision int8 without openvino).
    ("onnxruntime", "int8", "int8"),
)


def resolve(backend: str, precision: str, bundles: list[ModelBundle], skip: tuple[str, ...] = ()) -> tuple[str, str]:
    """Resolve ``auto`` backend/precision to a concrete pair every bundle supports (never one in ``skip``)."""
    if backend != "auto" and precision != "auto":
        return backend, precision
    for name, prec, variant in AUTO_ORDER:
        if backend not in ("auto", name) or precision not in ("auto", prec) or name in skip:
            continue
        if not all(variant in b.manifest.get("variants", {}) for b in bundles):
            continue
        if name == "cuda":
            from . import onnxruntime_gpu

            if not onnxruntime_gpu.available():
                continue
        if name == "openvino":
            try:
                from . import openvino_cpu
            except ImportError:
                continue
            if prec == "bf16" and not openvino_cpu.has_bf16():
                continue
            if prec == "int8" and precision == "auto" and not openvino_cpu.has_int8_dot():
                continue
        return name, prec
    if backend == "auto":
        raise ConfigError(f"no backend supports precision {precision!r} for these bundles")
    return backend, "fp32"


def create_for(settings, bundle: ModelBundle) -> tuple[Backend, str, str]:
    """The backend for one model under the service settings: ``(backend, name, precision)``.

    With ``--backend auto``, a GPU backend that cannot start (driver or cuDNN missing, the load-time
    probe refused) is logged as an error and the next variant in ``AUTO_ORDER`` is used: a GPU
    machine then serves slowly instead of not at all. A backend asked for by name never falls back.
    """
    name, prec = resolve(settings.model.backend, settings.model.precision, [bundle])
    try:
        return create_backend(name, bundle, BackendOptions.from_settings(settings, prec)), name, prec
    except ConfigError as e:
        if settings.model.backend != "auto" or name != "cuda":
            raise
        log.error(
            "%s: the cuda backend cannot start (%s); --backend auto falls back to the CPU", bundle.name, e)
    name, prec = resolve(settings.model.backend, settings.model.precision, [bundle], skip=("cuda",))
    return create_backend(name, bundle, BackendOptions.from_settings(settings, prec)), name, prec


def available() -> list[str]:
    return sorted(REGISTRY)


def create_backend(name: str, bundle: ModelBundle, options: BackendOptions) -> Backend:
    if name not in REGISTRY:
        raise ConfigError(f"unknown backend {name!r}; valid backends: {', '.join(available())}")
    module_name, cls_name, install = REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"backend {name!r} needs a missing dependency ({e}); install it with: {install}") from e
    return getattr(module, cls_name)(bundle, options)
