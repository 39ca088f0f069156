"""Get: stored documents by id, through gRPC on a real server (no dataset needed)."""

from __future__ import annotations

import random

import grpc
import pytest

from rerankd.client import AsyncClient, Client, retry_service_config
from rerankd.embedded import EmbeddedServer

from util import assert_invalid, settings_for

MESSAGE_LIMIT = 64 * 1024  # small, so that a Get over the message limit is cheap to build


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("get-data")
    settings = settings_for(models_dir, data, server={"listen": "127.0.0.1:0", "max_message_bytes": MESSAGE_LIMIT})
    with EmbeddedServer(settings) as srv:
        yield srv


@pytest.fixture()
def client(server):
    with Client(server.target, timeout=120) as c:
        yield c


def test_get_returns_stored_documents_in_request_order(client):
    docs = [
        {"id": "g-1", "title": "Zebrafish", "text": "Fin regeneration needs osteoblast dedifferentiation.",
         "metadata": {"source": "lab", "year": "2020"}},
        {"id": "g-2", "text": "Aspirin lowers the risk of colorectal cancer."},
        {"id": "g-3", "title": "A title-only entry"},
    ]
    up = client.upsert(docs)
    r = client.get(["g-3", "never-written", "g-1", "g-2"])
    assert [d.id for d in r.documents] == ["g-3", "g-1", "g-2"]
    assert list(r.not_found) == ["never-written"]
    assert r.sequence >= up.sequence
    got = {d.id: (d.title, d.text, dict(d.metadata)) for d in r.documents}
    assert got == {
        "g-1": ("Zebrafish", "Fin regeneration needs osteoblast dedifferentiation.", {"source": "lab", "year": "2020"}),
        "g-2": ("", "Aspirin lowers the risk of colorectal cancer.", {}),
        "g-3": ("A title-only entry", "", {}),
    }
    # Only unknown ids: an empty answer, not an error.
    none = client.get(["nope-1", "nope-2"])
    assert list(none.documents) == [] and list(none.not_found) == ["nope-1", "nope-2"]


def test_get_follows_replace_and_delete(client):
    for version in range(1, 4):
        up = client.upsert([{"id": "g-r", "text": f"Version {version} of a replaced document.",
                             "metadata": {"version": str(version)} if version < 3 else {}}])
        r = client.get(["g-r"])  # issued after the acknowledgement: reads that write, never an older one
        assert r.sequence >= up.sequence
        assert [(d.text, dict(d.metadata)) for d in r.documents] == [
            (f"Version {version} of a replaced document.", {"version": str(version)} if version < 3 else {})]
    gone = client.delete(["g-r"])
    r = client.get(["g-r"])
    assert list(r.documents) == [] and list(r.not_found) == ["g-r"] and r.sequence >= gone.sequence


def test_get_many_ids_across_store_chunks(client):
    """The store reads ids 500 at a time; a full call (max_items = 512) spans two chunks and still
    comes back complete, in the caller's order."""
    docs = [{"id": f"g-many-{i}", "text": f"Short document number {i} about cell biology."} for i in range(512)]
    client.upsert(docs[:256])
    client.upsert(docs[256:])
    ids = [d["id"] for d in docs]
    random.Random(7).shuffle(ids)
    r = client.get(ids)
    assert [d.id for d in r.documents] == ids and list(r.not_found) == []
    assert all(d.text == f"Short document number {d.id.rsplit('-', 1)[1]} about cell biology." for d in r.documents)


def test_get_over_the_message_limit_names_ids(client):
    big = "Protein folding in the endoplasmic reticulum. " * 600  # ~28 KB each; three exceed 64 KiB
    for i in range(3):
        client.upsert([{"id": f"g-big-{i}", "text": big}])
    assert client.get(["g-big-0"]).documents[0].text == big
    details = assert_invalid(lambda: client.get([f"g-big-{i}" for i in range(3)]), "ids")
    assert "fewer ids" in details and str(MESSAGE_LIMIT) in details


@pytest.mark.parametrize(
    "ids, field",
    [
        ([], "ids"),
        (["a", "a"], "ids[1]"),
        ([""], "ids[0]"),
        (["a" * 600], "ids[0]"),
        ([str(i) for i in range(513)], "ids"),
    ],
)
def test_get_bad_input_is_invalid_argument_naming_the_field(client, ids, field):
    assert_invalid(lambda: client.get(ids), field)


def test_async_client_get(server, client):
    import asyncio

    client.upsert([{"id": "g-aio", "text": "Read back through the asyncio client."}])

    async def run():
        async with AsyncClient(server.target, timeout=120) as c:
            return await c.get(["g-aio", "g-aio-missing"])

    r = asyncio.run(run())
    assert [d.id for d in r.documents] == ["g-aio"] and list(r.not_found) == ["g-aio-missing"]


def test_get_is_retried_by_the_retry_policy():
    """Get is a read, safe to repeat: it is in the service config that retries overload refusals."""
    import json

    names = {m["method"] for m in json.loads(retry_service_config(3))["methodConfig"][0]["name"]}
    assert "Get" in names and "UpsertStream" not in names


def test_get_needs_the_auth_token(models_dir, tmp_path):
    settings = settings_for(models_dir, tmp_path, server={"listen": "127.0.0.1:0", "auth_token": "s3cret"})
    with EmbeddedServer(settings) as srv:
        with Client(srv.target, timeout=60) as anonymous:
            with pytest.raises(grpc.RpcError) as ei:
                anonymous.get(["x"])
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with Client(srv.target, timeout=60, metadata=[("authorization", "Bearer s3cret")]) as c:
            assert list(c.get(["x"]).not_found) == ["x"]


def test_store_get_reads_one_snapshot_across_chunks(tmp_path, monkeypatch):
    """Over 500 ids the read takes several statements; a write committed between two of them
    (another connection, as the apply thread) must be wholly in or out of the answer, and the
    sequence returned is the one the answer reflects."""
    import threading

    import numpy as np

    from rerankd import store as st

    s = st.DocumentStore(str(tmp_path / "get.sqlite3"))
    v = np.zeros(4, np.float32)
    _, _, seq0, _ = s.upsert([st.NewDocument(f"d{i}", "v1", "", {}, v, None) for i in range(600)])
    chunks = st._chunks

    def write_between_chunks(xs, n):
        for i, c in enumerate(chunks(xs, n)):
            if i == 1:  # d0 was read in chunk 0, d599 is read in chunk 1: change both now
                w = threading.Thread(target=s.upsert, args=([st.NewDocument(d, "v2", "", {}, v, None)
                                                              for d in ("d0", "d599")],))
                w.start()
                w.join()
            yield c

    monkeypatch.setattr(st, "_chunks", write_between_chunks)
    out, seq = s.get([f"d{i}" for i in range(600)])
    assert (out["d0"].text, out["d599"].text, seq) == ("v1", "v1", seq0)
    monkeypatch.setattr(st, "_chunks", chunks)
    out, seq = s.get(["d0", "d599"])
    assert (out["d0"].text, out["d599"].text) == ("v2", "v2") and seq > seq0
    s.close()
