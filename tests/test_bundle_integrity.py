"""A model bundle the server loads is the bytes the export wrote and gated, and a broken model
never reaches a caller as a score (a review served NaN scores from a model.onnx with 64 KiB
overwritten, and int8 scores from a corrupted OpenVINO .bin)."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest

from rerankd.bundle import ModelBundle, variant_problems
from rerankd.errors import BackendError, ConfigError
from rerankd.stages.embedder import Embedder
from rerankd.stages.reranker import Reranker


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture()
def bundle_dir(tmp_path):
    d = tmp_path / "models" / "ce"
    d.mkdir(parents=True)
    files = {"model.onnx": b"fp32 graph", "model.ov-int8.xml": b"<net/>", "model.ov-int8.bin": b"int8 weights",
             "gpu-probe.npz": b"probe"}
    for name, data in files.items():
        (d / name).write_bytes(data)
    manifest = {
        "format": "rerankd-bundle/1", "name": "ce", "task": "rerank", "max_length": 256,
        "inputs": ["input_ids", "attention_mask", "token_type_ids"], "special_tokens": {"pad_id": 0},
        "variants": {
            "fp32": {"file": "model.onnx", "sha256": _sha(files["model.onnx"])},
            "openvino-int8": {"file": "model.ov-int8.xml", "sha256": _sha(files["model.ov-int8.xml"]),
                              "weights_sha256": _sha(files["model.ov-int8.bin"])},
        },
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def test_intact_variants_load(bundle_dir):
    b = ModelBundle.load(bundle_dir.parent, "ce", "rerank")
    assert b.variant_file("fp32") == bundle_dir / "model.onnx"
    assert b.variant_file("openvino-int8") == bundle_dir / "model.ov-int8.xml"
    assert b.verified_file("gpu-probe.npz", _sha(b"probe")) == bundle_dir / "gpu-probe.npz"


def test_a_bundle_of_the_other_task_is_refused(bundle_dir):
    """--embedder and --reranker swapped must not start a server on the wrong model (a mutation
    audit: the task check could be dropped without a test failing)."""
    with pytest.raises(ConfigError, match="is a 'rerank' model, expected 'embed'"):
        ModelBundle.load(bundle_dir.parent, "ce", "embed")


def test_a_same_size_rewrite_with_the_old_mtime_is_hashed_again(bundle_dir):
    """The hash cache is keyed by inode and ctime too: a replacement of the same size whose mtime
    was set back (cp -p, rsync -t) must not reuse the old hash within one process."""
    import os

    b = ModelBundle.load(bundle_dir.parent, "ce", "rerank")
    f = bundle_dir / "model.onnx"
    assert b.variant_file("fp32") == f  # hashed and cached
    st = f.stat()
    f.write_bytes(b"fp32 grapH")  # same size, other bytes
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(ConfigError, match="model.onnx"):
        b.variant_file("fp32")


@pytest.mark.parametrize("name,variant,damage", [
    ("model.onnx", "fp32", "overwrite"),
    ("model.onnx", "fp32", "delete"),
    ("model.ov-int8.bin", "openvino-int8", "overwrite"),  # the .xml alone was checked before
    ("model.ov-int8.bin", "openvino-int8", "delete"),
])
def test_a_damaged_variant_is_refused_naming_the_file(bundle_dir, name, variant, damage):
    f = bundle_dir / name
    if damage == "delete":
        f.unlink()
    else:
        f.write_bytes(b"X" + f.read_bytes()[1:])  # same size: only the checksum can tell
    b = ModelBundle.load(bundle_dir.parent, "ce", "rerank")
    with pytest.raises(ConfigError, match=f"{variant} variant.*{name}.*re-export"):
        b.variant_file(variant)
    assert variant_problems(bundle_dir, b.manifest["variants"][variant])
    other = "openvino-int8" if variant == "fp32" else "fp32"
    b.variant_file(other)  # the intact variant still loads


def test_a_manifest_missing_keys_or_a_refused_variant_is_a_clear_config_error(bundle_dir):
    mf = bundle_dir / "manifest.json"
    m = json.loads(mf.read_text())
    m["refused_variants"] = {"int8": {"parity": {"passed": False}}}
    mf.write_text(json.dumps(m))
    with pytest.raises(ConfigError, match="'int8' variant was refused by its accuracy gate"):
        ModelBundle.load(bundle_dir.parent, "ce", "rerank").variant_file("int8")
    del m["special_tokens"]
    mf.write_text(json.dumps(m))
    with pytest.raises(ConfigError, match="manifest lacks special_tokens"):  # was a KeyError later
        ModelBundle.load(bundle_dir.parent, "ce", "rerank")


def test_older_manifests_still_load(bundle_dir, caplog):
    """Exports before the .xml got its own hash put the OpenVINO weights' hash in sha256; an entry
    with no checksum (the old bf16 entry) loads with a warning rather than being called damaged."""
    mf = bundle_dir / "manifest.json"
    m = json.loads(mf.read_text())
    ov = m["variants"]["openvino-int8"]
    ov["sha256"] = ov["weights_sha256"]
    m["variants"]["openvino-bf16"] = {"file": "model.onnx", "inference_precision": "bf16"}  # the old form
    mf.write_text(json.dumps(m))
    b = ModelBundle.load(bundle_dir.parent, "ce", "rerank")
    assert b.variant_file("openvino-int8").name == "model.ov-int8.xml"
    assert b.variant_file("openvino-bf16").name == "model.onnx"
    (bundle_dir / "model.ov-int8.bin").write_bytes(b"tampered!!!!")  # the weights are still checked
    with pytest.raises(ConfigError, match="model.ov-int8.bin does not match"):
        b.variant_file("openvino-int8")
    # The bf16 entry has no checksum, but fp32 gives model.onnx's: a tampered file is refused
    # through either (a review loaded it through the bf16 entry with a warning).
    (bundle_dir / "model.onnx").write_bytes(b"tampered graph")
    with pytest.raises(ConfigError, match="model.onnx does not match"):
        b.variant_file("openvino-bf16")
    # No checksum anywhere: loaded, with one warning per file however often it is loaded.
    del m["variants"]["fp32"]["sha256"]
    mf.write_text(json.dumps(m))
    b = ModelBundle.load(bundle_dir.parent, "ce", "rerank")
    for _ in range(3):
        b.variant_file("fp32")
    assert caplog.text.count("model.onnx has no checksum of its own") == 1


def test_a_damaged_gpu_probe_is_a_config_error(bundle_dir):
    (bundle_dir / "gpu-probe.npz").write_bytes(b"tampered")
    b = ModelBundle.load(bundle_dir.parent, "ce", "rerank")
    with pytest.raises(ConfigError, match="gpu-probe.npz does not match"):
        b.verified_file("gpu-probe.npz", _sha(b"probe"))


class _Backend:
    def __init__(self, out):
        self.out = out

    def run(self, ids, mask, types):
        return self.out


def test_non_finite_reranker_scores_fail_the_batch_instead_of_reaching_callers():
    ids = np.ones((3, 8), dtype=np.int64)
    good = SimpleNamespace(backend=_Backend(np.array([[1.0], [2.0], [3.0]], dtype=np.float32)), activation="none")
    assert Reranker._forward(good, ids, ids, ids * 0).tolist() == [1.0, 2.0, 3.0]
    bad = SimpleNamespace(backend=_Backend(np.array([[1.0], [np.nan], [np.inf]], dtype=np.float32)), activation="none")
    with pytest.raises(BackendError, match="2 non-finite scores"):
        Reranker._forward(bad, ids, ids, ids * 0)


def test_non_finite_embeddings_fail_the_batch_instead_of_entering_the_index():
    ids = np.ones((2, 4), dtype=np.int64)
    hidden = np.ones((2, 4, 3), dtype=np.float32)
    ok = SimpleNamespace(backend=_Backend(hidden), normalize=True)
    v = Embedder._forward(ok, ids, ids, ids * 0)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0)
    hidden[1, 2, 0] = np.nan
    with pytest.raises(BackendError, match="non-finite vectors"):
        Embedder._forward(SimpleNamespace(backend=_Backend(hidden), normalize=True), ids, ids, ids * 0)


def test_rich_error_details_are_read_safely():
    """client.error_details: a grpc.aio error (not a grpc.Call) is read too; details that do not
    match the status the client got (a transport error) read as none instead of raising; the
    server leaves details off a message too long for gRPC's metadata limit."""
    import grpc

    from rerankd import errors
    from rerankd.client import error_details
    from rerankd.server import RICH_MAX_MESSAGE, rich_details

    err = errors.InvalidArgument("items[3].id", "duplicate id")
    trailers = rich_details(err, grpc.StatusCode.INVALID_ARGUMENT)

    class AioLike:  # what grpc.aio.AioRpcError offers (it is not a grpc.Call)
        def __init__(self, code, details):
            self._code, self._details = code, details

        def code(self):
            return self._code

        def details(self):
            return self._details

        def trailing_metadata(self):
            return trailers

    got = error_details(AioLike(grpc.StatusCode.INVALID_ARGUMENT, str(err)))
    assert got == {"field_violations": [("items[3].id", "duplicate id")], "retry_delay_s": None}
    assert error_details(AioLike(grpc.StatusCode.RESOURCE_EXHAUSTED, "Stream removed"))["field_violations"] == []
    assert rich_details(errors.InvalidArgument("query", "x" * RICH_MAX_MESSAGE), grpc.StatusCode.INVALID_ARGUMENT) == ()
    hint = rich_details(errors.Overloaded("busy", retry_after_s=0.25), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert error_details(type("E", (AioLike,), {"trailing_metadata": lambda self: hint})(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "busy"))["retry_delay_s"] == 0.25
