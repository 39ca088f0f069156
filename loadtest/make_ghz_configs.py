#!/usr/bin/env python3
"""Write ghz (https://ghz.sh) config files for rerankd's Search, Score and Encode RPCs.

Each config carries a list of realistic request messages drawn from a BEIR dataset (queries
from queries.jsonl, Score candidates / Encode items from corpus.jsonl); ghz sends them
round-robin. ghz is a single Go binary that is not packaged for this development machine:
install it where you run the load, then

    python loadtest/make_ghz_configs.py --dataset ../shared/datasets/scifact --out bench-results/ghz \\
        --rps 20 --duration 30s --concurrency 8
    ghz --config bench-results/ghz/search.json
    ghz --config bench-results/ghz/score.json --format html --output bench-results/ghz-score.html

By default the configs point ghz at proto/rerankd/v1/rerankd.proto; ``--reflection`` leaves
the proto out so ghz asks the server (rerankd enables gRPC server reflection).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from google.protobuf import json_format  # noqa: E402

from payloads import METHOD, REPO, RPCS, SERVICE, Payloads, TargetError, check_target, default_dataset, load_dataset  # noqa: E402

PROTO = REPO / "proto" / "rerankd" / "v1" / "rerankd.proto"
_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def ghz_config(rpc: str, messages: list, *, host: str, rps: int, duration: str, concurrency: int,
               connections: int = 1, timeout: str = "10s", reflection: bool = False, proto: Path = PROTO,
               asynchronous: bool = False) -> dict:
    """One ghz JSON config (keys as ghz's runner.Config spells them)."""
    cfg: dict = {
        "name": f"rerankd {METHOD[rpc]}",
        "call": f"{SERVICE}.{METHOD[rpc]}",
        "host": host,
        "insecure": True,
        "rps": rps,
        "duration": duration,
        "concurrency": concurrency,
        "connections": connections,
        "timeout": timeout,
        # Proto field names; ghz's JSON->proto parser accepts them as well as lowerCamelCase.
        "data": [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in messages],
        "tags": {"rpc": METHOD[rpc]},
    }
    if asynchronous:
        cfg["async"] = True
    if not reflection:
        cfg["proto"] = str(proto)
        # ghz parses an absolute proto by its base name against the import paths: list its own
        # directory, and the proto root for anything it might import.
        cfg["import-paths"] = [str(proto.parent), str(proto.parents[2])]
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make_ghz_configs.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default=None, help=f"BEIR dataset dir (default $RERANKD_DATASET or {default_dataset()})")
    p.add_argument("--out", default="bench-results/ghz", help="output directory (one <rpc>.json per RPC)")
    p.add_argument("--rpc", default=",".join(RPCS), help="comma-separated RPCs to write configs for")
    p.add_argument("--host", default="127.0.0.1:50051", help="server address written into the configs")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host")
    p.add_argument("--rps", type=int, default=20, help="ghz rate limit, requests per second")
    p.add_argument("--duration", default="30s", help="ghz run duration (Go duration: 30s, 2m)")
    p.add_argument("--concurrency", type=int, default=8, help="ghz workers")
    p.add_argument("--connections", type=int, default=1, help="gRPC connections")
    p.add_argument("--timeout", default="10s", help="per-call deadline (Go duration)")
    p.add_argument("--async", dest="asynchronous", action="store_true",
                   help="ghz async mode: send at the rate without waiting for responses (open loop)")
    p.add_argument("--messages", type=int, default=200, help="request messages per config (sent round-robin)")
    p.add_argument("--candidates", type=int, default=50, help="Search: first-stage candidates; Score: items per call")
    p.add_argument("--top-n", type=int, default=10, help="Search: hits returned")
    p.add_argument("--encode-batch", type=int, default=8, help="Encode: items per call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reflection", action="store_true", help="omit the proto: ghz uses server reflection")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    rpcs = [r.strip().lower() for r in args.rpc.split(",") if r.strip()]
    if not rpcs or any(r not in RPCS for r in rpcs):
        p.error(f"--rpc: valid values are {', '.join(RPCS)}")
    for name in ("duration", "timeout"):
        if not _DURATION.match(getattr(args, name)):
            p.error(f"--{name} must be a Go duration like 30s or 2m, got {getattr(args, name)!r}")
    for name in ("rps", "concurrency", "connections", "messages"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    try:
        check_target(args.host, args.allow_remote)
    except TargetError as e:
        p.error(str(e))
    try:
        ds = load_dataset(args.dataset)
    except (FileNotFoundError, ValueError) as e:
        print(f"make_ghz_configs: {e}", file=sys.stderr)
        return 1
    payloads = Payloads(ds, candidates=args.candidates, top_n=args.top_n, encode_batch=args.encode_batch, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for rpc in rpcs:
        cfg = ghz_config(rpc, payloads.pool(rpc, args.messages), host=args.host, rps=args.rps,
                         duration=args.duration, concurrency=args.concurrency, connections=args.connections,
                         timeout=args.timeout, reflection=args.reflection, asynchronous=args.asynchronous)
        path = out / f"{rpc}.json"
        path.write_text(json.dumps(cfg, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
        print(f"{path}: {cfg['call']}, {len(cfg['data'])} messages, {args.rps} rps for {args.duration}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
