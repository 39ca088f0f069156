"""The ``rerankd`` command: serve, export, train-reranker, index, eval, bench, health, config."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from . import config as cfg


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


_EARLY_SIGNALS: list[int] = []


def _catch_early_signals() -> dict:
    """Record SIGTERM/SIGINT until the server installs its own handlers (see ``server.serve``);
    returns the handlers they replaced."""
    return {sig: signal.signal(sig, lambda signum, frame: _EARLY_SIGNALS.append(signum))
            for sig in (signal.SIGTERM, signal.SIGINT)}


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    settings = cfg.settings_from_args(args)
    cfg.check_settings(settings)  # before logging is set up from --log-level
    _setup_logging(settings.server.log_level)
    return asyncio.run(serve(settings, early_signal=lambda: bool(_EARLY_SIGNALS)))


def _offline_tool(command: str, module: str, func: str):
    """Subcommands that live in the torch-only ``rerankd_export`` package."""

    def run(args: argparse.Namespace) -> int:
        _setup_logging()
        try:
            fn = getattr(__import__(module, fromlist=[func]), func)
        except ImportError as e:
            print(f"rerankd {command} needs the export extra ({e}): pip install torch==2.13.0 -e '.[export]'", file=sys.stderr)
            return 2
        return fn(args)

    return run


_cmd_export = _offline_tool("export", "rerankd_export.export", "run_export")
_cmd_train = _offline_tool("train-reranker", "rerankd_export.train_reranker", "run_train")


def _cmd_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from .client import connection, open_channel

    try:
        with open_channel(args.target, **connection(args, target=args.target)) as ch:  # TLS with --tls-ca; health needs no token
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as e:
        print(f"{args.target}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:  # an unreadable --tls-ca, a flag missing its pair
        print(f"rerankd health: {e}", file=sys.stderr)
        return 2
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(name)
    return 0 if resp.status == health_pb2.HealthCheckResponse.SERVING else 1


def _cmd_config(args: argparse.Namespace) -> int:
    print(cfg.markdown_table())
    return 0


def _cmd_backends(args: argparse.Namespace) -> int:
    from .backends import REGISTRY

    for name, (_, _, install) in sorted(REGISTRY.items()):
        print(f"{name}\t({install})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rerankd", description="Two-stage retrieval over gRPC.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gRPC server", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cfg.add_arguments(s)
    s.set_defaults(func=_cmd_serve)

    e = sub.add_parser("export", help="export models to ONNX bundles (needs the export extra)")
    try:
        from rerankd_export.export import add_export_arguments

        add_export_arguments(e)
    except ImportError:
        e.add_argument("rest", nargs=argparse.REMAINDER)
    e.set_defaults(func=_cmd_export)

    t = sub.add_parser("train-reranker", help="fine-tune the cross-encoder (needs the export extra)")
    try:
        from rerankd_export.train_reranker import add_train_arguments

        add_train_arguments(t)
    except ImportError:
        t.add_argument("rest", nargs=argparse.REMAINDER)
    t.set_defaults(func=_cmd_train)

    for name, module, help_text in (
        ("index", "rerankd.ingest", "bulk-ingest a JSONL file (embedded or --target server)"),
        ("eval", "rerankd.evaluate", "measure retrieval quality on a BEIR dataset"),
        ("eval-compare", "rerankd.significance", "are two eval runs different beyond noise? (paired tests)"),
        ("bench", "rerankd.bench", "benchmark rerank and Search latency"),
    ):
        mod = __import__(module, fromlist=["add_arguments", "run"])
        sp = sub.add_parser(name, help=help_text)
        mod.add_arguments(sp)
        sp.set_defaults(func=mod.run)

    h = sub.add_parser("health", help="gRPC health check (exit 0 when SERVING)")
    h.add_argument("--target", default=os.environ.get("RERANKD_TARGET", "localhost:50051"))
    h.add_argument("--service", default="")
    h.add_argument("--timeout", type=float, default=3.0)
    cfg.add_connection_arguments(h)
    h.set_defaults(func=_cmd_health)

    c = sub.add_parser("config", help="print the configuration table (flags, env vars, defaults)")
    c.set_defaults(func=_cmd_config)
    b = sub.add_parser("backends", help="list inference backends")
    b.set_defaults(func=_cmd_backends)
    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import ConfigError

    previous = {}
    if (argv if argv is not None else sys.argv[1:])[:1] == ["serve"]:
        previous = _catch_early_signals()  # before the heavy imports below and in serve
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except ConfigError as e:  # a bad flag, environment variable or TLS file: one line naming it
        print(f"rerankd {args.command}: {e}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():  # main() called in-process (tests) leaves them as found
            signal.signal(sig, handler)
        _EARLY_SIGNALS.clear()


if __name__ == "__main__":
    raise SystemExit(main())
