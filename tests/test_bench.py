"""``rerankd bench``'s gRPC rows on a tiny corpus: the budgeted Score rows report how many
passages each call scored (numbers of speed are the benchmark's business, not the tests')."""

from __future__ import annotations

import argparse
import json

import pytest

from rerankd import bench


def test_score_budget_rows_report_the_passages_scored(models_dir, tmp_path):
    (tmp_path / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": f"d{i}", "title": f"Study {i}", "text": f"aspirin trial {i} and colon cancer risk"}) + "\n"
        for i in range(8)), encoding="utf-8")
    (tmp_path / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "aspirin colon cancer"}) + "\n",
                                            encoding="utf-8")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--dataset", str(tmp_path), "--models-dir", str(models_dir), "--runs", "2", "--pairs", "4",
                              "--skip-search", "--concurrency", "0", "--score-budgets-ms", "600000", "1"])
    b = bench.Bench(args)
    b.grpc_rows()
    names = [r["name"] for r in b.rows]
    assert len(names) == 3 and names[0].startswith("gRPC Score 4 passages")
    whole, tiny = b.rows[1], b.rows[2]
    assert whole["budget_ms"] == 600000 and whole["n"] == 2
    assert (whole["scored_mean"], whole["scored_min"], whole["scored_max"]) == (4, 4, 4)  # the budget covers all
    # 1 ms is below one pair's time: nothing, or a one-pair probe (at most one a second)
    assert tiny["budget_ms"] == 1 and 0 <= tiny["scored_min"] <= tiny["scored_max"] <= 1
    table = b.markdown()
    assert "budget 600000 ms" in table and "scored per call 4.0 (min 4, max 4)" in table


@pytest.mark.parametrize("value", ["0", "-5", "3600001", "fast"])
def test_score_budgets_must_be_budgets_the_server_takes(value, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--dataset", str(tmp_path), "--score-budgets-ms", "100", value])
    assert "--score-budgets-ms" in capsys.readouterr().err
