"""GPU backend: ONNX Runtime with the TensorRT or CUDA execution provider (``onnxruntime-gpu``).

Precisions:

* ``fp16`` (the GPU default) — with the **CUDA** provider, the bundle's ``model.fp16.onnx``
  (written by ``rerankd export --fp16``: ONNX Runtime's BERT fusions — fused ``Attention``,
  ``EmbedLayerNormalization``, ``SkipLayerNormalization`` — then float16 with float32 I/O); with
  the **TensorRT** provider, the fp32 ``model.onnx`` compiled by TensorRT with fp16 enabled (TensorRT
  fuses by itself and cannot run ORT's contrib operators), its engines cached on disk;
* ``fp32`` — ``model.onnx`` on the CUDA provider with TF32 off (always CUDA: TensorRT would allow TF32
  in an fp32 engine).

Provider choice (``--gpu-provider``): ``auto`` takes TensorRT when this onnxruntime build has it
and its libraries load, else CUDA. Nothing here ever runs on the CPU by accident: ONNX Runtime
silently falls back to the CPU provider when a GPU provider fails to initialise, so the backend
checks which providers the session really got and refuses to start without a GPU one.

Accuracy at load: the fp16 variant carries a probe (``gpu-probe.npz``: real parity batches and
their fp32 outputs, written at export). The backend runs it on the device it will serve from and
refuses to start when the drift exceeds the gate stored with it — the export-time gate could
only check the fp16 graph on a CPU, this one checks fp16 arithmetic and the kernels/engines of
the serving GPU. The figures are kept in ``probe_result`` and logged at load.

Shapes: TensorRT builds an engine for the profile min (1 x 1) .. max (largest batch bucket x the
bundle's max length), optimised at the max; the batcher warms every bucket before SERVING, so no
engine build or kernel autotune ever happens on a live call.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..bundle import ModelBundle
from ..drift import rerank_drift
from ..errors import BackendError, ConfigError
from . import BackendOptions

log = logging.getLogger("rerankd.backends.gpu")

PRECISIONS = ("fp16", "fp32")
PROVIDER_NAMES = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
INSTALL_HINT = ("install the GPU build of ONNX Runtime in place of the CPU one: "
                "pip uninstall -y onnxruntime && pip install onnxruntime-gpu")


def gpu_count() -> int:
    """Number of CUDA devices the driver reports (0 without a driver or a GPU); never raises."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    try:
        if cuda.cuInit(0) != 0:
            return 0
        n = ctypes.c_int(0)
        return int(n.value) if cuda.cuDeviceGetCount(ctypes.byref(n)) == 0 else 0
    except (AttributeError, OSError):
        return 0


_preloaded = False


def _preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN from the pip ``nvidia-*`` wheels when they are installed
    (``pip install 'onnxruntime-gpu[cuda,cudnn]'``, as the GPU image does); a no-op otherwise."""
    global _preloaded
    if _preloaded:
        return
    _preloaded = True
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is not None:
        try:
            preload()
        except Exception as e:  # missing libraries surface again, with context, at session creation
            log.debug("onnxruntime.preload_dlls(): %s", e)


def cuda_provider_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


def available() -> bool:
    """True when ``--backend auto`` may pick this backend: a GPU build of onnxruntime and a GPU."""
    return cuda_provider_available() and gpu_count() > 0


def _tensorrt_loadable() -> bool:
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return False
    for lib in ("libnvinfer.so.10", "libnvinfer.so"):
        try:
            ctypes.CDLL(lib)
            return True
        except OSError:
            continue
    return False


def _profile(inputs: list[str], batch: int, length: int) -> str:
    return ",".join(f"{name}:{batch}x{length}" for name in inputs)


def session_providers(provider: str, precision: str, options: BackendOptions, inputs: list[str],
                      max_length: int, cache_dir: Path) -> list[tuple[str, dict]]:
    """The (provider, options) list for one session; CUDA always follows TensorRT for its leftovers."""
    cuda = ("CUDAExecutionProvider", {
        "device_id": options.device_id,
        "arena_extend_strategy": "kSameAsRequested",
        "do_copy_in_default_stream": True,
        # fp32 means fp32: no TF32 tensor-core rounding behind the user's back.
        "use_tf32": 0 if precision == "fp32" else 1,
    })
    if provider != "tensorrt":
        return [cuda]
    cache_dir.mkdir(parents=True, exist_ok=True)
    max_batch = max(1, options.max_batch)
    trt = ("TensorrtExecutionProvider", {
        "device_id": options.device_id,
        "trt_fp16_enable": precision == "fp16",
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
        "trt_profile_min_shapes": _profile(inputs, 1, 1),
        "trt_profile_opt_shapes": _profile(inputs, max_batch, max_length),
        "trt_profile_max_shapes": _profile(inputs, max_batch, max_length),
    })
    return [trt, cuda]


class OnnxRuntimeGpuBackend:
    name = "cuda"

    def __init__(self, bundle: ModelBundle, options: BackendOptions) -> None:
        if options.precision not in PRECISIONS:
            raise ConfigError(f"cuda backend: precision must be one of {', '.join(PRECISIONS)}, got {options.precision!r}")
        if not cuda_provider_available():
            raise ConfigError(f"cuda backend: this onnxruntime ({ort.__version__}) has no CUDA execution provider; {INSTALL_HINT}")
        if options.gpu_provider not in ("auto", "tensorrt", "cuda"):
            raise ConfigError(f"gpu_provider must be auto, tensorrt or cuda, got {options.gpu_provider!r}")
        self.precision = options.precision
        _preload_cuda_libraries()
        n_gpus = gpu_count()
        if options.device_id < 0 or options.device_id >= n_gpus:
            raise ConfigError(f"cuda backend: device_id {options.device_id} but the CUDA driver reports {n_gpus} GPU(s)")
        provider = options.gpu_provider
        if self.precision == "fp32":
            provider = "cuda"  # TensorRT would allow TF32 in fp32 engines: fp32 means fp32
        elif provider == "auto":
            provider = "tensorrt" if _tensorrt_loadable() else "cuda"
        elif provider == "tensorrt" and not _tensorrt_loadable():
            raise ConfigError("gpu_provider tensorrt: this onnxruntime has no TensorRT execution provider or "
                              "libnvinfer does not load; install TensorRT 10 or use --gpu-provider cuda")
        fp16 = bundle.manifest.get("variants", {}).get("fp16")
        if self.precision == "fp16" and fp16 is None:
            raise ConfigError(f"bundle {bundle.name!r} has no gated fp16 variant; re-export with `rerankd export --fp16`")
        variant = "fp16" if self.precision == "fp16" and provider == "cuda" else "fp32"
        path = bundle.variant_file(variant)
        # TensorRT's engine cache is not keyed by the weights: the directory is, together with what
        # shapes the engine's profile (largest batch, max length) and the runtime that built it.
        sha = str(bundle.manifest["variants"][variant].get("sha256", ""))[:12]
        cache_dir = Path(options.tensorrt_cache_dir or bundle.path / ".tensorrt-cache") / (
            f"{bundle.name}-{sha}-{self.precision}-b{options.max_batch}-t{bundle.max_length}-ort{ort.__version__}")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = options.threads or 1  # host-side ops only: the GPU does the work
        so.log_severity_level = 3
        providers = session_providers(provider, self.precision, options, list(bundle.input_names),
                                      bundle.max_length, cache_dir)
        try:
            # enable_fallback=0: onnxruntime would otherwise retry a failed provider with others
            # (and without our options) at creation, and switch a session for good to the CPU
            # after a failed run.
            self._session = ort.InferenceSession(str(path), sess_options=so, providers=providers, enable_fallback=0)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ConfigError(f"cuda backend: cannot load {path.name} on GPU {options.device_id} ({provider}): {e}") from e
        self._session.disable_fallback()
        active = self._session.get_providers()
        want = PROVIDER_NAMES[provider]
        if not active or active[0] != want:
            raise ConfigError(f"cuda backend: asked onnxruntime for {want}, got {active} (no usable GPU "
                              f"{options.device_id}?); refusing to serve a GPU configuration on another provider")
        got_device = str(self._session.get_provider_options().get(want, {}).get("device_id", options.device_id))
        if got_device != str(options.device_id):
            raise ConfigError(f"cuda backend: {want} runs on device {got_device}, not the configured {options.device_id}")
        self.provider = active[0]
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._output = self._session.get_outputs()[0].name
        self.probe_result = self._check_probe(bundle, fp16)
        log.info("%s: %s %s on GPU %d from %s; probe %s", bundle.name, self.provider, self.precision,
                 options.device_id, path.name, self.probe_result)

    def static_shapes(self) -> bool:
        # TensorRT builds per shape range and cuDNN/cuBLAS pick kernels on first use of a shape:
        # warm every bucket before SERVING.
        return True

    def health(self) -> None:
        if self._session is None:
            raise BackendError("onnxruntime GPU session closed")

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self._session.run([self._output], {k: feeds[k] for k in self._inputs})[0]

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        try:
            return np.asarray(self._run(feeds), dtype=np.float32)
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendError(f"onnxruntime GPU ({self.provider}) failed on a batch of shape {input_ids.shape}: {e}") from e

    def _check_probe(self, bundle: ModelBundle, fp16: dict | None) -> dict:
        """Re-run the export's probe batches here; refuse to start past the gate."""
        probe = (fp16 or {}).get("probe")
        if not probe:
            return {"checked": False, "why": "bundle has no GPU probe (exported without --fp16)"}
        path = bundle.verified_file(probe["file"], probe.get("sha256"))  # ConfigError: auto falls back
        try:
            data = np.load(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"bundle {bundle.name!r}: unreadable GPU probe {probe['file']}: {e}") from e
        # The embed probe holds pooled vectors: pool exactly as the embed stage serves them.
        from ..stages.embedder import mean_pool  # lazy: the stage module imports this package

        task = bundle.manifest["task"]
        gate = probe.get("gate") or {}
        need = ("min_cosine",) if task == "embed" else ("max_diff_in_sd",)
        if "reference_0" not in data or any(k not in gate for k in need):
            # a ConfigError, not a crash: under --backend auto the next CPU variant then serves
            raise ConfigError(f"bundle {bundle.name!r}: GPU probe {probe['file']} has no cases or its gate lacks {need}; re-export")
        refs, outs = [], []
        i = 0
        while f"reference_{i}" in data:
            feeds = {name: data[f"{name}_{i}"].astype(np.int64) for name in bundle.input_names}
            got = np.asarray(self._run(feeds), dtype=np.float64)
            ref = data[f"reference_{i}"].astype(np.float64)
            if task == "embed":
                got = mean_pool(got, feeds["attention_mask"], normalize=True).astype(np.float64)
            refs.append(ref.reshape(len(ref), -1))
            outs.append(got.reshape(len(ref), -1))
            i += 1
        ref, got = np.concatenate(refs), np.concatenate(outs)
        if task == "embed":
            worst = float(np.min(np.sum(ref * got, axis=1)))
            ok = bool(np.isfinite(worst) and worst >= gate["min_cosine"])
            result = {"checked": True, "rows": int(len(ref)), "min_cosine": round(worst, 6), "gate": gate, "passed": ok}
        else:
            sd = (fp16.get("parity") or {}).get("logit_std_fp32")
            rec = rerank_drift(ref[:, 0], got[:, 0], gate, sd=sd)
            ok = rec["passed"]
            result = {"checked": True, "rows": int(len(ref)), "max_abs_diff": round(rec["max_abs_diff"], 5),
                      "max_diff_in_sd": round(rec["max_diff_in_sd"], 5), "spearman": round(rec["spearman"], 6),
                      "pair_agreement": round(rec["pair_agreement"], 6), "pairs_compared": rec["pairs_compared"],
                      "gate": gate, "passed": ok}
        if not ok:
            raise ConfigError(f"bundle {bundle.name!r} on {self.provider} {self.precision}: the GPU probe drifted past "
                              f"its gate: {result}; serve another precision (--precision fp32) or re-export")
        return result

