"""loadtest/: the open-loop driver's scheduler, the open-loop driver and the Locust file run
headless against a real embedded server, and the ghz config generator."""

from __future__ import annotations

import asyncio
import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from google.protobuf import json_format, message_factory

from rerankd.client import Client
from rerankd.embedded import EmbeddedServer
from rerankd.v1 import rerankd_pb2 as pb

from util import settings_for

REPO = Path(__file__).resolve().parents[1]
LOADTEST = REPO / "loadtest"
sys.path.insert(0, str(LOADTEST))

import make_ghz_configs  # noqa: E402
import openloop  # noqa: E402
import payloads  # noqa: E402

# Never import locust here: it monkey-patches the process for gevent. It runs in a subprocess.
needs_locust = pytest.mark.skipif(importlib.util.find_spec("locust") is None,
                                  reason="locust not installed: pip install -e '.[loadtest]'")

DOCS = [
    ("d1", "Aspirin and colorectal cancer", "Regular aspirin use lowers the long-term risk of colorectal cancer."),
    ("d2", "Vitamin D", "Vitamin D supplementation did not reduce fracture risk in older women."),
    ("d3", "Sleep and memory", "Slow-wave sleep consolidates declarative memory in healthy volunteers."),
    ("d4", "Exercise", "Aerobic exercise improves insulin sensitivity in type 2 diabetes."),
    ("d5", "Smoking", "Cigarette smoking is the leading cause of lung cancer worldwide."),
    ("d6", "Coffee", "Moderate coffee consumption is associated with lower all-cause mortality."),
    ("d7", "Statins", "Statins reduce LDL cholesterol and cardiovascular events."),
    ("d8", "Antibiotics", "Overuse of antibiotics drives the spread of resistant bacteria."),
    ("d9", "Vaccines", "Measles vaccination prevents outbreaks when coverage is high."),
    ("d10", "Salt", "High dietary salt intake raises blood pressure."),
]
QUERIES = ["does aspirin prevent colon cancer", "vitamin d and bone fractures", "how does sleep affect memory",
           "exercise and diabetes", "what causes lung cancer", "is coffee healthy"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("beir")
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        for doc_id, title, text in DOCS:
            f.write(json.dumps({"_id": doc_id, "title": title, "text": text}) + "\n")
    with open(root / "queries.jsonl", "w", encoding="utf-8") as f:
        for i, q in enumerate(QUERIES):
            f.write(json.dumps({"_id": f"q{i}", "text": q}) + "\n")
    return root


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory, dataset):
    with EmbeddedServer(settings_for(models_dir, tmp_path_factory.mktemp("data"))) as srv:
        with Client(srv.target, timeout=120) as c:
            c.upsert([{"id": i, "title": t, "text": x} for i, t, x in DOCS])
        yield srv


# -- the scheduler, with fake senders (no server) -----------------------------------------------------
def test_schedule_launches_on_time_even_when_the_sender_is_slow():
    rps, count, slow = 50.0, 25, 0.4
    state = {"inflight": 0, "peak": 0}

    async def send(i: int) -> str:
        state["inflight"] += 1
        state["peak"] = max(state["peak"], state["inflight"])
        await asyncio.sleep(slow)
        state["inflight"] -= 1
        return "OK"

    t0 = time.perf_counter()
    outcomes, elapsed = asyncio.run(openloop.run_schedule(send, rps=rps, count=count))
    wall = time.perf_counter() - t0
    assert [o.index for o in outcomes] == list(range(count))
    assert all(o.code == "OK" for o in outcomes)
    for o in outcomes:
        assert o.scheduled == pytest.approx(o.index / rps)
        assert o.launched is not None and o.launched >= o.scheduled - 1e-3
    lags = sorted(o.launched - o.scheduled for o in outcomes)
    assert lags[len(lags) // 2] < 0.03, lags  # median: on time
    assert lags[-1] < 0.2, lags  # generous: shared CI cores
    # Not closed-loop: launches did not wait for completions.
    assert state["peak"] >= 15, state
    assert wall < (count - 1) / rps + slow + 1.0 < count * slow
    assert all(o.latency >= slow - 1e-3 for o in outcomes)
    assert elapsed <= wall


def test_latency_is_measured_from_the_scheduled_time():
    """A client stall delays launches; the delay must show up in latency (no coordinated omission)."""
    rps, count, stall = 100.0, 20, 0.25

    async def send(i: int) -> str:
        if i == 0:
            time.sleep(stall)  # blocks the event loop: the requests due meanwhile launch late
        return "OK"

    outcomes, _ = asyncio.run(openloop.run_schedule(send, rps=rps, count=count))
    late = [o for o in outcomes if 0 < o.scheduled < stall - 0.05]
    assert late
    for o in late:
        assert o.launched - o.scheduled > 0.03
        assert o.latency >= o.launched - o.scheduled  # lag included
        assert o.latency >= stall - o.scheduled - 0.02


def test_requests_beyond_max_inflight_are_dropped_not_delayed():
    async def send(i: int) -> str:
        await asyncio.sleep(0.3)
        return "OK"

    outcomes, elapsed = asyncio.run(openloop.run_schedule(send, rps=40.0, count=12, max_inflight=2))
    codes = [o.code for o in outcomes]
    assert codes[:2] == ["OK", "OK"]
    assert codes.count(openloop.DROPPED) >= 8
    for o in outcomes:
        if o.code == openloop.DROPPED:
            assert o.launched is None and o.latency is None
    s = openloop.summarize(outcomes, elapsed, rps=40.0, duration=0.3)
    assert s["dropped"] == codes.count(openloop.DROPPED) and s["errors"] == s["dropped"]
    assert s["sent"] == 12 - s["dropped"]


def test_drain_deadline_cancels_stragglers_and_errors_are_counted():
    async def send(i: int) -> str:
        if i == 0:
            await asyncio.sleep(60)
        if i == 1:
            raise RuntimeError("sender bug")
        return "UNAVAILABLE" if i == 2 else "OK"

    t0 = time.perf_counter()
    outcomes, _ = asyncio.run(openloop.run_schedule(send, rps=100.0, count=4, drain_timeout=0.2))
    assert time.perf_counter() - t0 < 5
    assert [o.code for o in outcomes] == [openloop.CLIENT_TIMEOUT, "CLIENT_ERROR:RuntimeError", "UNAVAILABLE", "OK"]
    s = openloop.summarize(outcomes, 1.0, rps=100.0, duration=0.04)
    assert s["ok"] == 1 and s["errors"] == 3 and s["codes"]["UNAVAILABLE"] == 1


def test_percentiles_are_nearest_rank():
    xs = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert openloop.percentile(xs, 50) == 0.050
    assert openloop.percentile(xs, 99) == 0.099
    assert openloop.percentile(xs, 100) == 0.100
    assert openloop.percentile([], 99) is None


@pytest.mark.parametrize("target", ["127.0.0.1:50051", "localhost:1", "[::1]:50051", "127.8.9.10:5",
                                    "unix:///var/run/rerankd/rerankd.sock", "ipv4:127.0.0.1:50051", "dns:///localhost:5"])
def test_loopback_targets_are_allowed(target):
    assert payloads.check_target(target) == target


@pytest.mark.parametrize("target", ["10.0.0.1:50051", "192.168.1.2:50051", "8.8.8.8:53", "example.com:50051",
                                    "[2001:db8::1]:50051", "ipv4:127.0.0.1:1,10.0.0.1:1"])
def test_remote_targets_are_refused_unless_allowed(target):
    with pytest.raises(payloads.TargetError):
        payloads.check_target(target)
    assert payloads.check_target(target, allow_remote=True) == target
    with pytest.raises(SystemExit):
        openloop.main(["--target", target, "--rps", "1", "--duration", "1"])


# -- against a real server ------------------------------------------------------------------------------
def test_openloop_runs_every_rpc_without_failures(server, dataset, tmp_path):
    out = tmp_path / "openloop.json"
    proc = subprocess.run(
        [sys.executable, str(LOADTEST / "openloop.py"), "--target", server.target, "--rpc", "search,score,encode",
         "--rps", "4", "--duration", "2", "--candidates", "6", "--encode-batch", "4", "--timeout", "30",
         "--dataset", str(dataset), "--json", str(out)],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["mode"] == "fixed" and report["target"] == server.target
    assert [r["rpc"] for r in report["runs"]] == ["search", "score", "encode"]
    for r in report["runs"]:
        assert r["requests"] == 8 and r["codes"] == {"OK": 8}, r
        assert r["errors"] == 0 and r["dropped"] == 0
        lat = r["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert r["achieved_rps"] > 0
    assert "p99 ms" in proc.stdout and "search" in proc.stdout


def test_openloop_find_capacity_reports_a_rate(server, dataset, tmp_path):
    out = tmp_path / "cap.json"
    proc = subprocess.run(
        [sys.executable, str(LOADTEST / "openloop.py"), "--target", server.target, "--rpc", "encode",
         "--encode-batch", "1", "--find-capacity", "--start-rps", "2", "--step-factor", "2", "--max-rps", "4",
         "--step-duration", "1", "--p99-target-ms", "5000", "--refine", "0", "--dataset", str(dataset),
         "--json", str(out)],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    cap = report["capacity"]
    assert cap["max_rps"] == 4 and cap["limited_by"] == "max_rps", cap
    assert [r["offered_rps"] for r in report["runs"]] == [2, 4]
    assert all(r["passed"] for r in report["runs"])
    assert "max RPS with p99 <= 5000 ms" in proc.stdout


@needs_locust
def test_locust_headless_without_failures(server, dataset, tmp_path):
    prefix = tmp_path / "locust"
    html = tmp_path / "locust.html"
    env = {**os.environ, "RERANKD_DATASET": str(dataset), "RERANKD_CANDIDATES": "6",
           "RERANKD_ENCODE_BATCH": "4", "RERANKD_RPC_TIMEOUT": "30"}
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOADTEST / "locustfile.py"), "--headless", "-u", "3", "-r", "3",
         "-t", "4s", "--host", server.target, "--csv", str(prefix), "--html", str(html), "--only-summary",
         "--exit-code-on-error", "1", "--loglevel", "WARNING"],
        capture_output=True, text=True, timeout=180, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(f"{prefix}_stats.csv", newline="", encoding="utf-8") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    for name in ("Search", "Score", "Encode"):
        assert name in rows, f"no {name} calls: {sorted(rows)}"
        assert rows[name]["Type"] == "grpc"
        assert int(rows[name]["Request Count"]) > 0
        assert int(rows[name]["Failure Count"]) == 0, rows[name]
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert html.is_file() and html.stat().st_size > 1000


@needs_locust
def test_locust_refuses_a_remote_host(dataset, tmp_path):
    env = {**os.environ, "RERANKD_DATASET": str(dataset)}
    proc = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOADTEST / "locustfile.py"), "--headless", "-u", "1", "-r", "1",
         "-t", "2s", "--host", "10.9.8.7:50051"],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )
    assert proc.returncode == 2
    assert "not a loopback address" in proc.stderr


# -- ghz configs ---------------------------------------------------------------------------------------
# JSON keys of ghz's runner.Config.
GHZ_KEYS = {
    "proto", "protoset", "call", "cacert", "cert", "key", "skipTLS", "skipFirst", "cname", "authority", "insecure",
    "total", "async", "concurrency", "concurrency-schedule", "concurrency-start", "concurrency-end",
    "concurrency-step", "concurrency-step-duration", "concurrency-max-duration", "connections", "rps", "duration",
    "duration-stop", "max-duration", "timeout", "data", "data-file", "binary-file", "metadata", "metadata-file",
    "stream-interval", "output", "format", "connect-timeout", "keepalive", "cpus", "import-paths", "name", "tags",
    "reflect-metadata", "debug", "host", "enable-compression", "load-schedule", "load-start", "load-end",
    "load-step", "load-step-duration", "load-max-duration",
}


def test_ghz_configs_are_valid(dataset, tmp_path):
    out = tmp_path / "ghz"
    rc = make_ghz_configs.main(["--dataset", str(dataset), "--out", str(out), "--messages", "5", "--candidates", "4",
                                "--rps", "15", "--duration", "20s", "--concurrency", "4"])
    assert rc == 0
    service = pb.DESCRIPTOR.services_by_name["Retrieval"]
    for rpc, method in (("search", "Search"), ("score", "Score"), ("encode", "Encode")):
        cfg = json.loads((out / f"{rpc}.json").read_text(encoding="utf-8"))
        assert set(cfg) <= GHZ_KEYS, set(cfg) - GHZ_KEYS
        assert cfg["call"] == f"rerankd.v1.Retrieval.{method}"
        assert cfg["insecure"] is True
        assert cfg["rps"] == 15 and cfg["concurrency"] == 4 and cfg["duration"] == "20s"
        assert payloads.check_target(cfg["host"]) == "127.0.0.1:50051"
        proto = Path(cfg["proto"])
        assert proto.is_file() and f"rpc {method}(" in proto.read_text(encoding="utf-8")
        assert all(Path(p).is_dir() for p in cfg["import-paths"]) and str(proto.parent) in cfg["import-paths"]
        # data: a non-empty list of request messages in protobuf JSON (what ghz's jsonpb parses).
        assert isinstance(cfg["data"], list) and len(cfg["data"]) == 5
        cls = message_factory.GetMessageClass(service.methods_by_name[method].input_type)
        for item in cfg["data"]:
            msg = json_format.ParseDict(item, cls())
            if rpc == "search":
                assert msg.query in QUERIES and msg.candidates == 4 and 1 <= msg.top_n <= msg.candidates
            elif rpc == "score":
                assert msg.query in QUERIES and len(msg.items) == 4
                assert len({it.id for it in msg.items}) == 4 and all(it.text for it in msg.items)
            else:
                assert len(msg.items) >= 1 and not msg.is_query


def test_ghz_reflection_mode_and_remote_guard(dataset, tmp_path):
    out = tmp_path / "ghz"
    assert make_ghz_configs.main(["--dataset", str(dataset), "--out", str(out), "--rpc", "search", "--reflection",
                                  "--async"]) == 0
    cfg = json.loads((out / "search.json").read_text(encoding="utf-8"))
    assert "proto" not in cfg and "import-paths" not in cfg and cfg["async"] is True
    assert not (out / "score.json").exists()
    with pytest.raises(SystemExit):
        make_ghz_configs.main(["--dataset", str(dataset), "--out", str(out), "--host", "10.0.0.5:50051"])
    with pytest.raises(SystemExit):
        make_ghz_configs.main(["--dataset", str(dataset), "--out", str(out), "--duration", "30"])


# -- overload test: schedule, recovery, verdict (no server) ---------------------------------------------
def test_overload_schedule_has_three_phases_at_their_rates():
    times, bounds = openloop.overload_schedule(2.0, 8.0, 3.0, 2.0, 1.5)
    assert bounds == (3.0, 5.0, 6.5)
    assert sum(t < 3.0 for t in times) == 6
    assert sum(3.0 <= t < 5.0 for t in times) == 16
    assert sum(t >= 5.0 for t in times) == 3
    assert times == sorted(times)


def test_baseline_phase_is_long_enough_for_a_real_p99():
    # 0.39 rps for 40 s is 16 calls, whose nearest-rank p99 is their maximum: stretch to 100 calls
    assert openloop.baseline_seconds(0.39, 40.0, 100) == 257
    assert openloop.baseline_seconds(2.0, 90.0, 100) == 90.0  # already 180 calls
    assert openloop.baseline_seconds(0.39, 40.0, 0) == 40.0
    args = openloop.build_parser().parse_args(["--overload-test", "--capacity-rps", "1"])
    assert args.baseline_calls == 100
    with pytest.raises(SystemExit):
        openloop.main(["--overload-test", "--capacity-rps", "1", "--baseline-calls", "-1"])


def _o(i, scheduled, latency, code="OK"):
    return openloop.Outcome(i, scheduled, scheduled, None if latency is None else scheduled + latency, code)


def test_recovery_time_is_from_the_last_bad_call_after_the_drop():
    drop = 10.0
    outs = [_o(0, 9.0, 5.0), _o(1, 10.5, 3.0), _o(2, 11.0, 0.1, "RESOURCE_EXHAUSTED"), _o(3, 12.0, 0.2), _o(4, 13.0, 0.1)]
    assert openloop.recovery_time(outs, drop, p99_limit_s=0.5) == 2.0  # call 3 (due 2.0 s after) and later are fine
    assert openloop.recovery_time(outs[:1] + outs[3:], drop, 0.5) == 0.0
    assert openloop.recovery_time(outs + [_o(5, 14.0, 0.9)], drop, 0.5) is None  # the last call is still slow
    assert openloop.recovery_time(outs[:1], drop, 0.5) is None  # nothing after the drop: nothing shown


def test_overload_verdict_checks_each_target():
    args = openloop.build_parser().parse_args(["--overload-test", "--capacity-rps", "1"])
    def phase(codes, p99, rej_p99=None):
        return {"codes": codes, "ok": codes.get("OK", 0), "errors": sum(v for k, v in codes.items() if k != "OK"),
                "latency_ms": {"p99": p99}, "rejected_latency_ms": {"n": 1 if rej_p99 else 0, "p99": rej_p99}}
    outs = [_o(0, 1.0, 0.1), _o(1, 11.0, 0.1)]
    good = {"baseline": phase({"OK": 5}, 100.0), "overload": phase({"OK": 5, "RESOURCE_EXHAUSTED": 9}, 180.0, 2.0),
            "recovery": phase({"OK": 5}, 110.0)}
    v = openloop.judge_overload(good, outs, (10.0, 10.0, 20.0), args, {"start": 100 * 2**20, "end": 120 * 2**20})
    assert v["passed"] and v["admitted_p99_ratio"] == 1.8 and v["shed"] == 9 and v["rss_mb"]["growth_mb"] == 20.0
    slow = dict(good, overload=phase({"OK": 5, "RESOURCE_EXHAUSTED": 9}, 250.0, 2.0))
    assert not openloop.judge_overload(slow, outs, (10.0, 10.0, 20.0), args, {})["checks"]["admitted_p99_within_ratio"]
    crashed = dict(good, overload=phase({"OK": 5, "UNAVAILABLE": 3}, 150.0, 2.0))
    v = openloop.judge_overload(crashed, outs, (10.0, 10.0, 20.0), args, {})
    assert v["unexpected_codes"] == {"UNAVAILABLE": 3} and not v["passed"]
    leak = openloop.judge_overload(good, outs, (10.0, 10.0, 20.0), args, {"start": 100 * 2**20, "end": 300 * 2**20})
    assert not leak["checks"]["rss_growth_bounded"] and not leak["passed"]
    # --metrics-url given but unreadable (a typo, the endpoint down): a failed check, not a skipped one
    # (found by a review: PASS without any memory check)
    probe = openloop.build_parser().parse_args(["--overload-test", "--capacity-rps", "1",
                                                "--metrics-url", "http://127.0.0.1:9/metrics"])
    blind = openloop.judge_overload(good, outs, (10.0, 10.0, 20.0), probe, {"start": None, "peak": None, "end": None})
    assert blind["checks"]["rss_growth_bounded"] is False and not blind["passed"]
    assert "could not read" in blind["rss_mb"]["error"]
    shown = {"rpc": "search", "capacity_rps": 1.0, "baseline_rps": 0.25, "overload_rps": 4.0, **blind}
    assert "server RSS: could not read" in openloop.format_overload(shown)
    assert "rss_growth_bounded" not in openloop.judge_overload(good, outs, (10.0, 10.0, 20.0), args, {})["checks"]


def test_overload_test_needs_a_capacity():
    with pytest.raises(SystemExit):
        openloop.main(["--overload-test", "--rps", "1"])
    with pytest.raises(SystemExit):
        openloop.main(["--overload-test", "--capacity-rps", "1", "--rpc", "search,score"])
    with pytest.raises(SystemExit):  # the RSS probe is held to loopback like the target
        openloop.main(["--overload-test", "--capacity-rps", "1", "--metrics-url", "http://10.0.0.1:9464/metrics"])


def test_payloads_skip_blank_lines_and_a_bom(tmp_path):
    """eval and `rerankd index` take these files; openloop and locust crashed on them (a review)."""
    (tmp_path / "queries.jsonl").write_text('\ufeff{"_id": "q1", "text": "aspirin"}\n\n{"_id": "q2", "text": "statins"}\n',
                                            encoding="utf-8")
    (tmp_path / "corpus.jsonl").write_text('\ufeff{"_id": "d1", "text": "a"}\n  \n{"_id": "d2", "text": "b"}\n', encoding="utf-8")
    ds = payloads.load_dataset(tmp_path)
    assert ds.queries == ["aspirin", "statins"] and [d for d, _ in ds.docs] == ["d1", "d2"]


def test_overload_test_after_find_capacity_runs_at_the_rate_found(server, dataset, monkeypatch):
    """The README: with --find-capacity too, the overload test runs at the rate found. The code
    preferred --capacity-rps when both were given (found by a review)."""
    seen: list[float] = []

    async def found(*a, **kw):
        return {"rpc": "encode", "max_rps": 4.5, "limited_by": "p99", "p99_target_ms": 200.0, "max_error_rate": 0.01, "steps": []}

    async def overload(tgt, pl, rpc, capacity, args, log):
        seen.append(capacity)
        return {"skipped": "not run in this test", "passed": True, "phases": []}

    monkeypatch.setattr(openloop, "find_capacity", found)
    monkeypatch.setattr(openloop, "overload_test", overload)
    openloop.main(["--target", server.target, "--rpc", "encode", "--find-capacity", "--overload-test",
                   "--capacity-rps", "10", "--warmup", "0", "--dataset", str(dataset)])
    assert seen == [4.5]


def test_payloads_first_stage_only_search():
    ds = payloads.Dataset(["q one", "q two"], [("d1", "t1"), ("d2", "t2")], Path("."))
    assert not payloads.Payloads(ds).search().HasField("rerank")
    req = payloads.Payloads(ds, rerank=False).search()
    assert req.HasField("rerank") and req.rerank is False
    assert not req.HasField("budget_ms")
    req = payloads.Payloads(ds, budget_ms=300).search()
    assert req.HasField("budget_ms") and req.budget_ms == 300
    assert not payloads.Payloads(ds).score().HasField("budget_ms")
    assert payloads.Payloads(ds, budget_ms=300).score().budget_ms == 300


def test_overload_test_against_a_server_sheds_and_recovers(models_dir, dataset, tmp_path_factory, tmp_path):
    """A server admitting one Search at a time, driven at 8x a rate it serves easily: the excess is
    shed with RESOURCE_EXHAUSTED (never a crash code), the RSS probe reads the metrics endpoint, and
    the report carries every figure. Pass/fail of the timing checks is not asserted (no timing
    thresholds in tests); the codes and the structure are."""
    settings = settings_for(models_dir, tmp_path_factory.mktemp("data-ov"),
                            server={"listen": "127.0.0.1:0", "max_concurrent_search": 1, "metrics_listen": "127.0.0.1:0"})
    with EmbeddedServer(settings) as srv:
        with Client(srv.target, timeout=120) as c:
            c.upsert([{"id": i, "title": t, "text": x} for i, t, x in DOCS])
        out = tmp_path / "overload.json"
        proc = subprocess.run(
            [sys.executable, str(LOADTEST / "openloop.py"), "--target", srv.target, "--rpc", "search",
             "--candidates", "6", "--top-n", "3", "--overload-test", "--capacity-rps", "2", "--overload-factor", "20",
             "--baseline-s", "2", "--baseline-calls", "0", "--overload-s", "2", "--recovery-s", "2", "--timeout", "30",
             "--metrics-url", f"http://127.0.0.1:{srv.app.metrics_port}/metrics", "--dataset", str(dataset),
             "--json", str(out)],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode in (0, 1), proc.stdout + proc.stderr
        report = json.loads(out.read_text())
    ov = report["overload"]
    assert report["mode"] == "overload-test"
    assert [r["phase"] for r in report["runs"]] == ["baseline", "overload", "recovery"]
    assert [r["requests"] for r in report["runs"]] == [1, 80, 1]
    assert ov["baseline_ok"] == report["runs"][0]["ok"] == 1
    over = report["runs"][1]
    assert over["codes"].get("RESOURCE_EXHAUSTED", 0) > 0 and over["ok"] > 0, over
    assert set(over["codes"]) <= {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}, over
    assert "1 calls already in flight" in over["error_samples"]["RESOURCE_EXHAUSTED"]
    assert ov["shed"] == over["codes"]["RESOURCE_EXHAUSTED"] + over["codes"].get("DEADLINE_EXCEEDED", 0)
    assert ov["checks"]["no_unexpected_codes"] and ov["checks"]["baseline_all_ok"]
    assert ov["rss_mb"]["start"] > 50 and ov["rss_mb"]["peak"] >= min(ov["rss_mb"]["start"], ov["rss_mb"]["end"])
    assert "rss_growth_bounded" in ov["checks"]
    assert ("overall: PASS" in proc.stdout) == (proc.returncode == 0) == ov["passed"]
