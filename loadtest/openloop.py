#!/usr/bin/env python3
"""Open-loop (constant arrival rate) load generator for rerankd.

Request i is launched at ``start + i / rps`` whether or not earlier requests have completed,
and its latency is measured from that *scheduled* time. A closed-loop tool (N users, each
waiting for its response before sending the next) slows down with the server and hides the
queueing delay ("coordinated omission"); here a slow server shows up as latency, and a client
that falls behind its own schedule shows up as latency too, never as a silently lower rate.

    python loadtest/openloop.py --target 127.0.0.1:50051 --rpc search --rps 20 --duration 30 \\
        --dataset ../shared/datasets/scifact --json search-20rps.json
    python loadtest/openloop.py --rpc score --candidates 50 --find-capacity --p99-target-ms 200

Reports p50/p95/p99/max latency of OK calls, achieved RPS and counts per status code.
``--max-inflight`` bounds the calls outstanding at once: a request due while that many are
in flight is not sent and is counted as CLIENT_DROPPED (never delayed). Every run is bounded
in time and count, and targets loopback only unless ``--allow-remote``.

Exit status: 0 when every request got OK (fixed mode) / a capacity was found (find-capacity),
1 otherwise, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from payloads import METHOD, RPCS, Payloads, TargetError, check_target, default_dataset, load_dataset  # noqa: E402

DROPPED = "CLIENT_DROPPED"  # due while --max-inflight calls were outstanding: not sent
CLIENT_TIMEOUT = "CLIENT_TIMEOUT"  # still outstanding when the drain deadline passed: cancelled

Sender = Callable[[int], Awaitable[str]]


@dataclass
class Outcome:
    index: int
    scheduled: float  # seconds after the run's start at which it was due
    launched: float | None  # seconds after start at which it was handed to the sender (None: dropped)
    done: float | None  # seconds after start at which it completed (None: dropped or cancelled)
    code: str  # "OK", a grpc.StatusCode name, CLIENT_DROPPED, CLIENT_TIMEOUT or CLIENT_ERROR:<type>

    @property
    def latency(self) -> float | None:
        """Completion minus *scheduled* send time (includes any client-side launch lag)."""
        return None if self.done is None else self.done - self.scheduled


async def run_schedule(send: Sender, *, rps: float, count: int, max_inflight: int | None = None,
                       drain_timeout: float = 30.0, clock: Callable[[], float] = time.perf_counter,
                       ) -> tuple[list[Outcome], float]:
    """Call ``send(i)`` for i in 0..count-1 at ``start + i / rps``, each in its own task.

    Launches never wait for completions. ``send`` returns a status string ("OK" or an error
    code name). Returns the outcomes (index order) and the elapsed seconds.
    """
    if not rps > 0:
        raise ValueError(f"rps must be > 0, got {rps}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    outcomes: list[Outcome | None] = [None] * count
    tasks: set[asyncio.Task] = set()
    inflight = 0
    start = clock()

    async def one(i: int, scheduled: float, launched: float) -> None:
        nonlocal inflight
        done: float | None
        try:
            code = await send(i)
            done = clock() - start
        except asyncio.CancelledError:  # only we cancel: at the drain deadline
            code, done = CLIENT_TIMEOUT, None
        except Exception as e:  # a sender bug must not stop the schedule
            code, done = f"CLIENT_ERROR:{type(e).__name__}", clock() - start
        finally:
            inflight -= 1
        outcomes[i] = Outcome(i, scheduled, launched, done, str(code))

    for i in range(count):
        scheduled = i / rps
        delay = start + scheduled - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        elif i % 32 == 0:
            await asyncio.sleep(0)  # behind schedule: still let completions run now and then
        now = clock() - start
        if max_inflight is not None and inflight >= max_inflight:
            outcomes[i] = Outcome(i, scheduled, None, None, DROPPED)
            continue
        inflight += 1
        task = asyncio.create_task(one(i, scheduled, now))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=drain_timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    elapsed = clock() - start
    return [o for o in outcomes if o is not None], elapsed


# -- statistics ----------------------------------------------------------------------------------------
def percentile(sorted_xs: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an ascending sequence."""
    if not sorted_xs:
        return None
    k = max(0, math.ceil(q / 100.0 * len(sorted_xs)) - 1)
    return sorted_xs[min(k, len(sorted_xs) - 1)]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1e3, 3)


def _rejected(outcomes: Sequence[Outcome]) -> dict:
    lat = sorted(o.done - o.launched for o in outcomes  # type: ignore[operator]
                 if o.code in ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED") and o.done is not None and o.launched is not None)
    return {"n": len(lat), "p50": _ms(percentile(lat, 50)), "p99": _ms(percentile(lat, 99)), "max": _ms(lat[-1] if lat else None)}


def summarize(outcomes: Sequence[Outcome], elapsed: float, *, rps: float, duration: float) -> dict:
    codes = Counter(o.code for o in outcomes)
    ok = sorted(o.latency for o in outcomes if o.code == "OK" and o.latency is not None)
    launched = [o for o in outcomes if o.launched is not None]
    lag = sorted(o.launched - o.scheduled for o in launched)  # type: ignore[operator]
    done = [o.done for o in outcomes if o.code == "OK" and o.done is not None]
    n = len(outcomes)
    # The arrival window (n / rps), stretched to the last OK response if that came later.
    window = max([n / rps] + done) if n else elapsed
    errors = n - codes.get("OK", 0)
    return {
        "offered_rps": rps,
        "duration_s": duration,
        "requests": n,
        "sent": len(launched),
        "ok": codes.get("OK", 0),
        "errors": errors,
        "dropped": codes.get(DROPPED, 0),
        "error_rate": round(errors / n, 6) if n else 0.0,
        "codes": dict(sorted(codes.items())),
        # OK responses per second over the arrival window (or until the last OK response, if later).
        "achieved_rps": round(len(ok) / window, 3) if window > 0 else 0.0,
        "latency_ms": {
            "p50": _ms(percentile(ok, 50)), "p95": _ms(percentile(ok, 95)), "p99": _ms(percentile(ok, 99)),
            "max": _ms(ok[-1] if ok else None), "mean": _ms(sum(ok) / len(ok) if ok else None),
        },
        # Admission-control answers (RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED): how fast they come back.
        "rejected_latency_ms": _rejected(outcomes),
        # How late the client launched requests (its own overload shows here, and in latency).
        "launch_lag_ms": {"p99": _ms(percentile(lag, 99)), "max": _ms(lag[-1] if lag else None)},
        "elapsed_s": round(elapsed, 3),
    }


# -- gRPC ----------------------------------------------------------------------------------------------
class GrpcTarget:
    """grpc.aio channel(s) + a sender for one RPC over a pool of prebuilt requests."""

    def __init__(self, target: str, channels: int = 1) -> None:
        import grpc

        self._grpc = grpc
        opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        # Separate channels need distinct args, or gRPC shares one subchannel (connection) among them.
        self.channels = [grpc.aio.insecure_channel(target, options=opts + [("rerankd.loadtest.channel", i)])
                         for i in range(max(1, channels))]
        self.target = target
        self.error_samples: dict[str, str] = {}

    async def wait_ready(self, timeout: float) -> None:
        """Wait until the server's health service reports SERVING (models loaded)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channels[0])
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    break
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            except self._grpc.aio.AioRpcError as e:
                last = f"{e.code().name}: {e.details()}"
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.target} not SERVING after {timeout:.0f} s ({last})")
            await asyncio.sleep(0.5)
        for ch in self.channels[1:]:
            await asyncio.wait_for(ch.channel_ready(), timeout=max(1.0, deadline - time.monotonic()))

    def sender(self, rpc: str, requests: Sequence, timeout: float) -> Sender:
        from rerankd.v1 import rerankd_pb2_grpc as pb_grpc

        calls = [getattr(pb_grpc.RetrievalStub(ch), METHOD[rpc]) for ch in self.channels]
        aio_error = self._grpc.aio.AioRpcError
        samples = self.error_samples

        async def send(i: int) -> str:
            try:
                await calls[i % len(calls)](requests[i % len(requests)], timeout=timeout)
                return "OK"
            except aio_error as e:
                name = e.code().name
                samples.setdefault(name, (e.details() or "")[:300])
                return name

        return send

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()


async def run_step(tgt: GrpcTarget, payloads: Payloads, rpc: str, rps: float, duration: float, args) -> dict:
    count = min(int(round(rps * duration)), args.max_requests)
    requests = payloads.pool(rpc, min(count, 1024))
    send = tgt.sender(rpc, requests, args.timeout)
    outcomes, elapsed = await run_schedule(send, rps=rps, count=count, max_inflight=args.max_inflight,
                                           drain_timeout=args.timeout + 5.0)
    out = {"rpc": rpc, **summarize(outcomes, elapsed, rps=rps, duration=duration)}
    if tgt.error_samples:
        out["error_samples"] = dict(tgt.error_samples)
        tgt.error_samples.clear()
    return out


def step_ok(r: dict, p99_target_ms: float, max_error_rate: float) -> bool:
    p99 = r["latency_ms"]["p99"]
    return r["ok"] > 0 and p99 is not None and p99 <= p99_target_ms and r["error_rate"] <= max_error_rate


async def find_capacity(tgt: GrpcTarget, payloads: Payloads, rpc: str, args, log) -> dict:
    """Step the offered rate up (x step_factor) until p99 or the error rate breaks the target,
    then bisect between the last good and the first bad rate ``refine`` times."""
    t_end = time.monotonic() + args.max_total_s
    steps: list[dict] = []
    best: float | None = None
    bad: float | None = None
    rps = args.start_rps

    def budget_left() -> bool:
        return time.monotonic() + args.step_duration + args.timeout + 5 <= t_end

    while rps <= args.max_rps and budget_left():
        r = await run_step(tgt, payloads, rpc, rps, args.step_duration, args)
        r["passed"] = step_ok(r, args.p99_target_ms, args.max_error_rate)
        steps.append(r)
        log(r)
        if not r["passed"]:
            bad = rps
            break
        best = rps
        rps = round(rps * args.step_factor, 3)
    for _ in range(args.refine if bad is not None else 0):
        lo = best if best is not None else 0.0
        mid = round((lo + bad) / 2, 3)
        if mid <= 0 or (bad - lo) / bad < 0.05 or not budget_left():
            break
        r = await run_step(tgt, payloads, rpc, mid, args.step_duration, args)
        r["passed"] = step_ok(r, args.p99_target_ms, args.max_error_rate)
        steps.append(r)
        log(r)
        if r["passed"]:
            best = mid
        else:
            bad = mid
    return {
        "rpc": rpc,
        "p99_target_ms": args.p99_target_ms,
        "max_error_rate": args.max_error_rate,
        "max_rps": best,
        "first_failing_rps": bad,
        "limited_by": "target" if bad is not None else ("max_rps" if rps > args.max_rps else "time budget"),
        "steps": steps,
    }


# -- output --------------------------------------------------------------------------------------------
_COLS = ("rpc", "offered", "sent", "ok", "errors", "dropped", "achieved", "p50 ms", "p95 ms", "p99 ms", "max ms")


def _row(r: dict) -> list[str]:
    lat = r["latency_ms"]
    f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    row = [r["rpc"], f"{r['offered_rps']:g}", str(r["sent"]), str(r["ok"]), str(r["errors"]), str(r["dropped"]),
           f"{r['achieved_rps']:.1f}", f(lat["p50"]), f(lat["p95"]), f(lat["p99"]), f(lat["max"])]
    if "passed" in r:
        row.append("pass" if r["passed"] else "FAIL")
    return row


def format_table(results: Sequence[dict]) -> str:
    cols = list(_COLS) + (["p99/errors"] if any("passed" in r for r in results) else [])
    rows = [cols] + [_row(r) for r in results]
    widths = [max(len(row[i]) if i < len(row) else 0 for row in rows) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        codes = ", ".join(f"{k}={v}" for k, v in r["codes"].items())
        lag = r["launch_lag_ms"]
        lines.append(f"{r['rpc']} @ {r['offered_rps']:g} rps: {codes}; launch lag p99 {lag['p99']} ms, max {lag['max']} ms")
        for code, detail in r.get("error_samples", {}).items():
            lines.append(f"  {code}: {detail}")
    return "\n".join(lines)


# -- CLI -----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="openloop.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--target", default=os.environ.get("RERANKD_TARGET", "127.0.0.1:50051"),
                   help="server address (host:port or unix:///path); loopback only unless --allow-remote")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target")
    p.add_argument("--rpc", default="search", help="search | score | encode, or a comma-separated list (run in turn)")
    p.add_argument("--rps", type=float, default=10.0, help="offered requests per second (constant arrival rate)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of scheduled arrivals per run")
    p.add_argument("--max-requests", type=int, default=100_000, help="hard cap on requests per run")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds at --rps before each measured run (discarded)")
    p.add_argument("--candidates", type=int, default=50, help="Search: first-stage candidates; Score: items per call")
    p.add_argument("--top-n", type=int, default=10, help="Search: hits returned")
    p.add_argument("--encode-batch", type=int, default=8, help="Encode: items per call")
    p.add_argument("--encode-queries", action="store_true", help="Encode queries (is_query) instead of documents")
    p.add_argument("--max-inflight", type=int, default=256, help="most calls outstanding; beyond: CLIENT_DROPPED")
    p.add_argument("--timeout", type=float, default=10.0, help="per-call deadline, seconds")
    p.add_argument("--channels", type=int, default=1, help="gRPC channels (connections), used round-robin")
    p.add_argument("--dataset", default=None, help=f"BEIR dataset dir (default $RERANKD_DATASET or {default_dataset()})")
    p.add_argument("--seed", type=int, default=0, help="payload sampling seed")
    p.add_argument("--wait-ready", type=float, default=60.0, help="seconds to wait for the server to be SERVING")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="also write the results as JSON")
    c = p.add_argument_group("find-capacity")
    c.add_argument("--find-capacity", action="store_true", help="step the rate up to the max RPS meeting the p99 target")
    c.add_argument("--p99-target-ms", type=float, default=200.0, help="p99 latency target (OK calls)")
    c.add_argument("--max-error-rate", type=float, default=0.01, help="largest non-OK fraction a passing step may have")
    c.add_argument("--start-rps", type=float, default=2.0, help="first step's rate")
    c.add_argument("--step-factor", type=float, default=1.5, help="rate multiplier between steps")
    c.add_argument("--max-rps", type=float, default=1000.0, help="stop stepping above this rate")
    c.add_argument("--step-duration", type=float, default=10.0, help="seconds per step")
    c.add_argument("--refine", type=int, default=2, help="bisection steps between the last pass and the first fail")
    c.add_argument("--max-total-s", type=float, default=600.0, help="time budget for all steps")
    return p


def _validate(args, p: argparse.ArgumentParser) -> list[str]:
    rpcs = [r.strip().lower() for r in args.rpc.split(",") if r.strip()]
    bad = [r for r in rpcs if r not in RPCS]
    if not rpcs or bad:
        p.error(f"--rpc: unknown {bad or args.rpc!r}; valid: {', '.join(RPCS)}")
    if args.find_capacity and len(rpcs) != 1:
        p.error("--find-capacity takes a single --rpc")
    positive = ("rps", "duration", "timeout", "start_rps", "step_duration", "max_rps", "max_total_s")
    for name in positive:
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.step_factor <= 1:
        p.error("--step-factor must be > 1")
    for name in ("max_requests", "max_inflight", "channels", "candidates", "top_n", "encode_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        check_target(args.target, args.allow_remote)
    except TargetError as e:
        p.error(str(e))
    return rpcs


async def _amain(args, rpcs: list[str]) -> dict:
    ds = load_dataset(args.dataset)
    payloads = Payloads(ds, candidates=args.candidates, top_n=args.top_n, encode_batch=args.encode_batch,
                        encode_queries=args.encode_queries, seed=args.seed)
    tgt = GrpcTarget(args.target, args.channels)
    report: dict = {
        "tool": "rerankd-openloop",
        "mode": "find-capacity" if args.find_capacity else "fixed",
        "target": args.target,
        "dataset": str(ds.path),
        "params": {"candidates": args.candidates, "top_n": min(args.top_n, args.candidates),
                   "encode_batch": args.encode_batch, "encode_queries": args.encode_queries,
                   "max_inflight": args.max_inflight, "timeout_s": args.timeout, "channels": args.channels,
                   "seed": args.seed},
        "runs": [],
    }
    try:
        await tgt.wait_ready(args.wait_ready)

        def log(r: dict) -> None:
            print(format_table([r]).splitlines()[2], file=sys.stderr, flush=True)

        for rpc in rpcs:
            if args.warmup > 0:
                rate = args.start_rps if args.find_capacity else args.rps
                await run_step(tgt, payloads, rpc, rate, args.warmup, args)
            if args.find_capacity:
                cap = await find_capacity(tgt, payloads, rpc, args, log)
                report["capacity"] = {k: v for k, v in cap.items() if k != "steps"}
                report["runs"].extend(cap["steps"])
            else:
                report["runs"].append(await run_step(tgt, payloads, rpc, args.rps, args.duration, args))
    finally:
        await tgt.close()
    return report


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    rpcs = _validate(args, p)
    try:
        report = asyncio.run(_amain(args, rpcs))
    except (FileNotFoundError, ValueError, TimeoutError) as e:
        print(f"openloop: {e}", file=sys.stderr)
        return 1
    print(format_table(report["runs"]))
    if args.find_capacity:
        cap = report["capacity"]
        if cap["max_rps"] is None:
            print(f"\n{cap['rpc']}: no rate met p99 <= {cap['p99_target_ms']:g} ms (first step {args.start_rps:g} rps failed)")
        else:
            print(f"\n{cap['rpc']}: max RPS with p99 <= {cap['p99_target_ms']:g} ms and errors <= "
                  f"{cap['max_error_rate']:.1%}: {cap['max_rps']:g} (limited by {cap['limited_by']})")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.find_capacity:
        return 0 if report["capacity"]["max_rps"] is not None else 1
    return 0 if all(r["errors"] == 0 for r in report["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
