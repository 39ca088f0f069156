"""Inference backends: one small protocol, one registry.

A backend runs one padded batch of token ids through one exported model and returns the raw
output array. It knows nothing about stages, batching policy or gRPC. Adding a backend is one
file plus one entry in ``REGISTRY``; optional dependencies are imported lazily so that a missing
one fails with its install command.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from ..bundle import ModelBundle
from ..errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class BackendOptions:
    precision: str = "fp32"
    threads: int = 0


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


# name -> (module, class, pip extra that provides it)
REGISTRY: dict[str, tuple[str, str, str]] = {
    "onnxruntime": ("rerankd.backends.onnxruntime_cpu", "OnnxRuntimeBackend", "onnxruntime"),
    "openvino": ("rerankd.backends.openvino_cpu", "OpenVinoBackend", "rerankd[openvino]"),
}


def available() -> list[str]:
    return sorted(REGISTRY)


def create_backend(name: str, bundle: ModelBundle, options: BackendOptions) -> Backend:
    if name not in REGISTRY:
        raise ConfigError(f"unknown backend {name!r}; valid backends: {', '.join(available())}")
    module_name, cls_name, extra = REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"backend {name!r} needs a missing dependency ({e}); install it with: pip install '{extra}'") from e
    return getattr(module, cls_name)(bundle, options)
