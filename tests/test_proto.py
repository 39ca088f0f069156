"""The committed gRPC stubs are exactly what scripts/gen_proto.sh generates from the proto."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_up_to_date(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(["bash", str(REPO / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True, env=env, cwd=REPO)
    for name in ("rerankd_pb2.py", "rerankd_pb2.pyi", "rerankd_pb2_grpc.py"):
        fresh = (tmp_path / "rerankd" / "v1" / name).read_text()
        committed = (REPO / "service" / "rerankd" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run scripts/gen_proto.sh"


def test_conventional_names():
    from rerankd.v1 import rerankd_pb2 as pb

    svc = pb.DESCRIPTOR.services_by_name["Retrieval"]
    assert svc.full_name == "rerankd.v1.Retrieval"
    for m in svc.methods:
        assert m.input_type.name in (f"{m.name}Request", "UpsertRequest"), m.name
        assert m.output_type.name in (f"{m.name}Response", "UpsertResponse"), m.name
    assert "hits" in pb.SearchResponse.DESCRIPTOR.fields_by_name
    assert [f.name for f in pb.Item.DESCRIPTOR.fields] == ["id", "text"]
    assert set(pb.ScoreEntry.DESCRIPTOR.fields_by_name) == {"item_id", "score", "rank", "index"}
    assert "scores" in pb.ScoreResponse.DESCRIPTOR.fields_by_name
    assert {"id", "text", "metadata"} <= set(pb.Document.DESCRIPTOR.fields_by_name)
    assert "ids" in pb.DeleteRequest.DESCRIPTOR.fields_by_name
    assert "documents" in pb.StatsResponse.DESCRIPTOR.fields_by_name
