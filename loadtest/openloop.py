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
                       times: Sequence[float] | None = None) -> tuple[list[Outcome], float]:
    """Call ``send(i)`` for i in 0..count-1 at ``start + i / rps``, each in its own task.

    ``times`` (ascending seconds after start) replaces the constant rate: request i is due at
    ``start + times[i]`` (``rps`` and ``count`` are then ignored) — used for phased runs.
    Launches never wait for completions. ``send`` returns a status string ("OK" or an error
    code name). Returns the outcomes (index order) and the elapsed seconds.
    """
    if times is not None:
        times = list(times)
        if any(b < a for a, b in zip(times, times[1:])) or (times and times[0] < 0):
            raise ValueError("times must be ascending and >= 0")
        count = len(times)
    elif not rps > 0:
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
        scheduled = times[i] if times is not None else i / rps
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


# -- overload test -------------------------------------------------------------------------------------
_SHED = ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")  # admission control's answers: expected under overload
_HARMLESS = ("OK", DROPPED) + _SHED


def read_rss_bytes(metrics_url: str, timeout: float = 2.0) -> float | None:
    """``process_resident_memory_bytes`` from a Prometheus text endpoint (None if unavailable)."""
    import urllib.request

    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout) as r:  # noqa: S310 (loopback checked)
            text = r.read().decode("utf-8", "replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return float(line.split()[1])
    return None


def overload_schedule(base_rps: float, over_rps: float, baseline_s: float, overload_s: float,
                      recovery_s: float) -> tuple[list[float], tuple[float, float, float]]:
    """Arrival times for baseline -> overload -> recovery (constant rate inside each phase)."""
    times: list[float] = []
    t0 = 0.0
    for rps, length in ((base_rps, baseline_s), (over_rps, overload_s), (base_rps, recovery_s)):
        n = int(round(rps * length))
        times.extend(t0 + i / rps for i in range(n))
        t0 += length
    return times, (baseline_s, baseline_s + overload_s, baseline_s + overload_s + recovery_s)


def baseline_seconds(base_rps: float, baseline_s: float, min_calls: int) -> float:
    """Length of the baseline phase: at least ``baseline_s``, and long enough for ``min_calls``
    arrivals. A nearest-rank p99 of fewer than 100 samples is their maximum, which estimates a lower
    quantile (the max of 16 calls sits near p94), so a short baseline understates the unloaded p99
    and overstates the overload ratio."""
    return max(baseline_s, math.ceil(min_calls / base_rps) if min_calls > 0 else 0.0)


def _shifted(outcomes: Sequence[Outcome], lo: float, hi: float) -> list[Outcome]:
    return [Outcome(o.index, o.scheduled - lo, None if o.launched is None else o.launched - lo,
                    None if o.done is None else o.done - lo, o.code)
            for o in outcomes if lo <= o.scheduled < hi]


def recovery_time(outcomes: Sequence[Outcome], drop_at: float, p99_limit_s: float) -> float | None:
    """Seconds after the load dropped from which every call was OK within ``p99_limit_s``
    (None if the last call still was not)."""
    after = sorted((o for o in outcomes if o.scheduled >= drop_at), key=lambda o: o.scheduled)
    if not after:
        return None
    bad = [o for o in after if o.code != "OK" or o.latency is None or o.latency > p99_limit_s]
    if not bad:
        return 0.0
    if bad[-1] is after[-1]:
        return None
    nxt = after[after.index(bad[-1]) + 1]
    return round(nxt.scheduled - drop_at, 3)


def judge_overload(phases: dict, outcomes: Sequence[Outcome], bounds: tuple[float, float, float], args,
                   rss: dict) -> dict:
    base, over = phases["baseline"], phases["overload"]
    base_p99, over_p99 = base["latency_ms"]["p99"], over["latency_ms"]["p99"]
    ratio = round(over_p99 / base_p99, 3) if base_p99 and over_p99 else None
    rej = over["rejected_latency_ms"]
    rec_s = recovery_time(outcomes, bounds[1], args.max_p99_ratio * base_p99 / 1e3) if base_p99 else None
    unexpected = {k: v for p in phases.values() for k, v in p["codes"].items() if k not in _HARMLESS}
    checks = {
        "baseline_all_ok": base["errors"] == 0 and base["ok"] > 0,
        "admitted_p99_within_ratio": ratio is not None and ratio <= args.max_p99_ratio,
        "rejections_fast": rej["n"] > 0 and rej["p99"] is not None and rej["p99"] <= args.max_reject_ms,
        "recovered_within_grace": rec_s is not None and rec_s <= args.recovery_grace_s,
        "no_unexpected_codes": not unexpected,
    }
    if rss.get("start") is not None and rss.get("end") is not None:
        growth = (rss["end"] - rss["start"]) / 2**20
        rss["growth_mb"] = round(growth, 1)
        checks["rss_growth_bounded"] = growth <= args.max_rss_growth_mb
    elif getattr(args, "metrics_url", None):
        # asked for and not measured (a wrong URL, the endpoint down): a failed check, never a
        # silently skipped one (found by a review: PASS with no memory check at all)
        checks["rss_growth_bounded"] = False
        rss["error"] = f"could not read process_resident_memory_bytes from {args.metrics_url}"
    return {
        "baseline_p99_ms": base_p99, "admitted_p99_ms": over_p99, "admitted_p99_ratio": ratio,
        "baseline_ok": base["ok"],
        "admitted_ok": over["ok"], "shed": sum(over["codes"].get(k, 0) for k in _SHED),
        "rejected_p99_ms": rej["p99"], "recovery_s": rec_s, "unexpected_codes": unexpected,
        "limits": {"max_p99_ratio": args.max_p99_ratio, "max_reject_ms": args.max_reject_ms,
                   "recovery_grace_s": args.recovery_grace_s, "max_rss_growth_mb": args.max_rss_growth_mb},
        "rss_mb": {k: (round(v / 2**20, 1) if k not in ("growth_mb", "error") and v is not None else v) for k, v in rss.items()},
        "checks": checks, "passed": all(checks.values()),
    }


async def overload_test(tgt: GrpcTarget, payloads: Payloads, rpc: str, capacity: float, args, log) -> dict:
    """Baseline at ``--baseline-fraction`` x capacity, then ``--overload-factor`` x capacity, then
    the baseline rate again — one open-loop schedule, so the overload's queue carries into recovery."""
    base_rps = capacity * args.baseline_fraction
    over_rps = capacity * args.overload_factor
    baseline_s = baseline_seconds(base_rps, args.baseline_s, args.baseline_calls)
    times, bounds = overload_schedule(base_rps, over_rps, baseline_s, args.overload_s, args.recovery_s)
    if len(times) > args.max_requests:
        raise ValueError(f"overload test needs {len(times)} requests, more than --max-requests {args.max_requests}")
    requests = payloads.pool(rpc, min(len(times), 1024))
    send = tgt.sender(rpc, requests, args.timeout)
    rss: dict = {}
    samples: list[float] = []
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            v = await asyncio.to_thread(read_rss_bytes, args.metrics_url)
            if v is not None:
                samples.append(v)
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    watcher = None
    if args.metrics_url:
        rss["start"] = await asyncio.to_thread(read_rss_bytes, args.metrics_url)
        watcher = asyncio.create_task(watch())
    try:
        outcomes, elapsed = await run_schedule(send, rps=1.0, count=0, times=times, max_inflight=args.max_inflight,
                                               drain_timeout=args.timeout + 5.0)
    finally:
        stop.set()
        if watcher is not None:
            await watcher
    if args.metrics_url:
        rss["peak"] = max(samples) if samples else None
        rss["end"] = await asyncio.to_thread(read_rss_bytes, args.metrics_url)
    phases = {}
    for name, lo, hi, rate in (("baseline", 0.0, bounds[0], base_rps), ("overload", bounds[0], bounds[1], over_rps),
                               ("recovery", bounds[1], bounds[2], base_rps)):
        part = _shifted(outcomes, lo, hi)
        r = {"rpc": rpc, "phase": name, **summarize(part, hi - lo, rps=rate, duration=hi - lo)}
        phases[name] = r
        log(r)
    if tgt.error_samples:
        phases["overload"]["error_samples"] = dict(tgt.error_samples)
        tgt.error_samples.clear()
    verdict = judge_overload(phases, outcomes, bounds, args, rss)
    return {"rpc": rpc, "capacity_rps": capacity, "baseline_rps": round(base_rps, 3), "overload_rps": round(over_rps, 3),
            **verdict, "phases": list(phases.values())}


# -- output --------------------------------------------------------------------------------------------
_COLS = ("rpc", "offered", "sent", "ok", "errors", "dropped", "achieved", "p50 ms", "p95 ms", "p99 ms", "max ms")


def _row(r: dict) -> list[str]:
    lat = r["latency_ms"]
    f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    row = [r["rpc"] + (f" {r['phase']}" if "phase" in r else ""), f"{r['offered_rps']:g}", str(r["sent"]), str(r["ok"]), str(r["errors"]), str(r["dropped"]),
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


def format_overload(v: dict) -> str:
    if "skipped" in v:
        return f"\noverload test skipped: {v['skipped']}"
    lim = v["limits"]
    mark = lambda ok: "pass" if ok else "FAIL"  # noqa: E731
    c = v["checks"]
    lines = [
        f"\noverload test ({v['rpc']}): capacity {v['capacity_rps']:g} rps, baseline {v['baseline_rps']:g} rps, "
        f"overload {v['overload_rps']:g} rps",
        f"  admitted p99 {v['admitted_p99_ms']} ms = {v['admitted_p99_ratio']}x baseline p99 {v['baseline_p99_ms']} ms "
        f"(of {v.get('baseline_ok')} baseline calls) "
        f"(<= {lim['max_p99_ratio']:g}x): {mark(c['admitted_p99_within_ratio'])}; {v['admitted_ok']} admitted OK, {v['shed']} shed",
        f"  rejections p99 {v['rejected_p99_ms']} ms (<= {lim['max_reject_ms']:g} ms): {mark(c['rejections_fast'])}",
        f"  recovered {v['recovery_s']} s after the load dropped (<= {lim['recovery_grace_s']:g} s): "
        f"{mark(c['recovered_within_grace'])}",
        f"  unexpected codes {v['unexpected_codes'] or 'none'}: {mark(c['no_unexpected_codes'])}",
    ]
    if "rss_growth_bounded" in c:
        r = v["rss_mb"]
        if r.get("error"):
            lines.append(f"  server RSS: {r['error']}: {mark(c['rss_growth_bounded'])}")
        else:
            lines.append(f"  server RSS {r.get('start')} -> peak {r.get('peak')} -> {r.get('end')} MiB (growth {r.get('growth_mb')} MiB "
                         f"<= {lim['max_rss_growth_mb']:g}): {mark(c['rss_growth_bounded'])}")
    lines.append(f"  overall: {'PASS' if v['passed'] else 'FAIL'}")
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
    o = p.add_argument_group("overload-test", "baseline -> overload -> recovery in one open-loop schedule, judged")
    o.add_argument("--overload-test", action="store_true",
                   help="run the overload test at --capacity-rps (or at the rate --find-capacity finds)")
    o.add_argument("--capacity-rps", type=float, default=None, help="the measured capacity the test scales from")
    o.add_argument("--overload-factor", type=float, default=4.0, help="overload rate = factor x capacity")
    o.add_argument("--baseline-fraction", type=float, default=0.25,
                   help="baseline and recovery rate = fraction x capacity (the 'unloaded' reference)")
    o.add_argument("--baseline-s", type=float, default=30.0, help="seconds of baseline arrivals (at least)")
    o.add_argument("--baseline-calls", type=int, default=100,
                   help="lengthen the baseline phase to at least this many arrivals, so that its p99 is a p99 "
                        "(nearest rank over < 100 calls is their maximum, a lower quantile); 0 = --baseline-s only")
    o.add_argument("--overload-s", type=float, default=60.0, help="seconds of overload arrivals")
    o.add_argument("--recovery-s", type=float, default=20.0, help="seconds of arrivals after the load drops")
    o.add_argument("--max-p99-ratio", type=float, default=2.0,
                   help="admitted calls' p99 under overload <= ratio x baseline p99 (also the recovery bar)")
    o.add_argument("--max-reject-ms", type=float, default=10.0, help="p99 of RESOURCE_EXHAUSTED/DEADLINE_EXCEEDED answers")
    o.add_argument("--recovery-grace-s", type=float, default=5.0,
                   help="every call due this long after the load drops must be OK within the p99 bar")
    o.add_argument("--metrics-url", default=None,
                   help="server's Prometheus endpoint (e.g. http://127.0.0.1:9464/metrics): RSS before/peak/after")
    o.add_argument("--max-rss-growth-mb", type=float, default=100.0, help="RSS after minus before, at most")
    p.add_argument("--no-rerank", dest="rerank", action="store_false", default=None,
                   help="Search: first stage only (SearchRequest.rerank = false)")
    p.add_argument("--budget-ms", type=int, default=None,
                   help="Search and Score: soft latency budget (budget_ms; default: unset, Search: the server's)")
    p.add_argument("--use-cache", action="store_true",
                   help="Search and Score: let the server's score cache answer repeated pairs (default: skip_cache, "
                        "the model scores every pair; the payloads repeat a few hundred queries)")
    return p


def _validate(args, p: argparse.ArgumentParser) -> list[str]:
    rpcs = [r.strip().lower() for r in args.rpc.split(",") if r.strip()]
    bad = [r for r in rpcs if r not in RPCS]
    if not rpcs or bad:
        p.error(f"--rpc: unknown {bad or args.rpc!r}; valid: {', '.join(RPCS)}")
    if args.find_capacity and len(rpcs) != 1:
        p.error("--find-capacity takes a single --rpc")
    if args.overload_test:
        if len(rpcs) != 1:
            p.error("--overload-test takes a single --rpc")
        if args.capacity_rps is None and not args.find_capacity:
            p.error("--overload-test needs --capacity-rps or --find-capacity")
        for name in ("overload_factor", "baseline_fraction", "baseline_s", "overload_s", "recovery_s", "max_p99_ratio",
                     "max_reject_ms", "recovery_grace_s"):
            if not getattr(args, name) > 0:
                p.error(f"--{name.replace('_', '-')} must be > 0")
        if args.baseline_calls < 0:
            p.error("--baseline-calls must be >= 0")
        if args.capacity_rps is not None and not args.capacity_rps > 0:
            p.error("--capacity-rps must be > 0")
        if args.metrics_url and not args.allow_remote:
            from urllib.parse import urlparse
            host = urlparse(args.metrics_url).hostname or ""
            try:
                check_target(f"{host}:0" if ":" not in host else f"[{host}]:0", False)
            except TargetError:
                p.error(f"--metrics-url {args.metrics_url!r} is not on a loopback address (or pass --allow-remote)")
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
                        encode_queries=args.encode_queries, seed=args.seed, rerank=args.rerank,
                        budget_ms=args.budget_ms, use_cache=args.use_cache)
    tgt = GrpcTarget(args.target, args.channels)
    report: dict = {
        "tool": "rerankd-openloop",
        "mode": "+".join(m for m, on in (("find-capacity", args.find_capacity), ("overload-test", args.overload_test)) if on)
        or "fixed",
        "target": args.target,
        "dataset": str(ds.path),
        "params": {"candidates": args.candidates, "top_n": min(args.top_n, args.candidates),
                   "encode_batch": args.encode_batch, "encode_queries": args.encode_queries,
                   "max_inflight": args.max_inflight, "timeout_s": args.timeout, "channels": args.channels,
                   "seed": args.seed, "rerank": args.rerank, "budget_ms": args.budget_ms,
                   "use_cache": args.use_cache},
        "runs": [],
    }
    try:
        await tgt.wait_ready(args.wait_ready)

        def log(r: dict) -> None:
            print(format_table([r]).splitlines()[2], file=sys.stderr, flush=True)

        for rpc in rpcs:
            if args.warmup > 0:
                rate = (args.start_rps if args.find_capacity
                        else args.capacity_rps * args.baseline_fraction if args.overload_test else args.rps)
                await run_step(tgt, payloads, rpc, rate, args.warmup, args)
            if args.find_capacity:
                cap = await find_capacity(tgt, payloads, rpc, args, log)
                report["capacity"] = {k: v for k, v in cap.items() if k != "steps"}
                report["runs"].extend(cap["steps"])
            if args.overload_test:
                # the rate just found, when --find-capacity ran (README); else --capacity-rps
                capacity = report["capacity"]["max_rps"] if args.find_capacity else args.capacity_rps
                if capacity is None:
                    report["overload"] = {"rpc": rpc, "passed": False, "skipped": "no capacity found"}
                else:
                    ov = await overload_test(tgt, payloads, rpc, capacity, args, log)
                    report["overload"] = {k: v for k, v in ov.items() if k != "phases"}
                    report["runs"].extend(ov["phases"])
            elif not args.find_capacity:
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
    if args.overload_test:
        print(format_overload(report["overload"]))
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.overload_test:
        return 0 if report["overload"]["passed"] else 1
    if args.find_capacity:
        return 0 if report["capacity"]["max_rps"] is not None else 1
    return 0 if all(r["errors"] == 0 for r in report["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
