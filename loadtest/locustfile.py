"""Locust load test for rerankd's gRPC API: one user class per RPC (Search, Score, Encode).

Locust has no built-in gRPC user, so this follows the pattern from Locust's documentation:
grpc runs on gevent (``grpc.experimental.gevent.init_gevent()``) and a client interceptor fires
Locust's ``request`` event for every call. Queries come from a BEIR ``queries.jsonl``, Score
candidates and Encode items from its ``corpus.jsonl``.

    locust -f loadtest/locustfile.py --headless -u 6 -r 2 -t 60s --host 127.0.0.1:50051 \\
        --dataset ../shared/datasets/scifact --csv bench-results/locust --html bench-results/locust.html
    locust -f loadtest/locustfile.py ... SearchUser          # one RPC only

Locust users are closed-loop (each waits for its response): good for mixes and soak runs, but
latency under overload is understated. Use ``openloop.py`` for latency at a fixed arrival rate.

Options (flags, or the environment variable in brackets):
  --dataset DIR        BEIR dataset directory [RERANKD_DATASET]
  --candidates N       Search first-stage candidates / Score items per call [RERANKD_CANDIDATES] (50)
  --top-n N            Search hits [RERANKD_TOP_N] (10)
  --encode-batch N     Encode items per call [RERANKD_ENCODE_BATCH] (8)
  --rpc-timeout S      per-call deadline, seconds [RERANKD_RPC_TIMEOUT] (10)
  --allow-remote       allow a non-loopback --host [RERANKD_ALLOW_REMOTE]
The default host is $RERANKD_TARGET or 127.0.0.1:50051. Bound every run with -t.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()  # before any channel exists: grpc's I/O must cooperate with gevent

import grpc  # noqa: E402
from locust import User, between, events, task  # noqa: E402
from locust.exception import StopUser  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from payloads import Payloads, TargetError, check_target, default_dataset, load_dataset  # noqa: E402
from rerankd.v1 import rerankd_pb2_grpc as pb_grpc  # noqa: E402

DEFAULT_HOST = os.environ.get("RERANKD_TARGET", "127.0.0.1:50051")
_state: dict = {}


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    g = parser.add_argument_group("rerankd")
    g.add_argument("--dataset", type=str, env_var="RERANKD_DATASET", default=str(default_dataset()),
                   help="BEIR dataset directory (queries.jsonl, corpus.jsonl)")
    g.add_argument("--candidates", type=int, env_var="RERANKD_CANDIDATES", default=50,
                   help="Search: first-stage candidates; Score: items per call")
    g.add_argument("--top-n", type=int, env_var="RERANKD_TOP_N", default=10, help="Search: hits returned")
    g.add_argument("--encode-batch", type=int, env_var="RERANKD_ENCODE_BATCH", default=8, help="Encode: items per call")
    g.add_argument("--budget-ms", type=int, env_var="RERANKD_BUDGET_MS", default=-1,
                   help="Search and Score: soft latency budget (budget_ms); -1 = unset (Search: the server's default)")
    g.add_argument("--use-cache", action="store_true", env_var="RERANKD_USE_CACHE", default=False,
                   help="Search and Score: let the server's score cache answer repeated pairs (default: skip_cache)")
    g.add_argument("--rpc-timeout", type=float, env_var="RERANKD_RPC_TIMEOUT", default=10.0,
                   help="per-call deadline, seconds")
    g.add_argument("--allow-remote", action="store_true", env_var="RERANKD_ALLOW_REMOTE", default=False,
                   help="allow a non-loopback --host")


@events.init.add_listener
def _on_init(environment, **_kw) -> None:
    opts = environment.parsed_options
    host = environment.host or DEFAULT_HOST
    try:
        check_target(host, bool(getattr(opts, "allow_remote", False)))
    except TargetError as e:
        # Refuse before any user starts; exit code 2.
        print(f"rerankd locustfile: {e}", file=sys.stderr)
        os._exit(2)
    ds = load_dataset(getattr(opts, "dataset", None) or default_dataset())
    _state["dataset"] = ds
    _state["timeout"] = float(getattr(opts, "rpc_timeout", 10.0))
    _state["params"] = {
        "candidates": int(getattr(opts, "candidates", 50)),
        "top_n": int(getattr(opts, "top_n", 10)),
        "encode_batch": int(getattr(opts, "encode_batch", 8)),
        "budget_ms": None if int(getattr(opts, "budget_ms", -1)) < 0 else int(opts.budget_ms),
        "use_cache": bool(getattr(opts, "use_cache", False)),
    }


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Reports every unary call to Locust (name = RPC method, response length = bytes)."""

    def __init__(self, environment) -> None:
        self.env = environment

    def intercept_unary_unary(self, continuation, client_call_details, request):
        method = client_call_details.method
        if isinstance(method, bytes):
            method = method.decode()
        name = method.rsplit("/", 1)[-1]
        start = time.perf_counter()
        exception = None
        length = 0
        call = continuation(client_call_details, request)
        try:
            length = call.result().ByteSize()
        except grpc.RpcError as e:
            exception = e
        self.env.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length,
            response=None,
            context={},
            exception=exception,
        )
        return call


class RerankdUser(User):
    """Base: one gRPC channel per simulated user, with the Locust interceptor."""

    abstract = True
    host = DEFAULT_HOST
    wait_time = between(0.0, 0.2)

    def __init__(self, environment) -> None:
        super().__init__(environment)
        target = self.host or DEFAULT_HOST
        channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
        self._raw_channel = channel
        self.stub = pb_grpc.RetrievalStub(grpc.intercept_channel(channel, LocustInterceptor(environment)))
        if "dataset" not in _state:  # the init listener did not run (e.g. imported by a tool)
            raise StopUser()
        self.timeout = _state["timeout"]
        self.payloads = Payloads(_state["dataset"], seed=id(self) & 0xFFFF, **_state["params"])

    def on_stop(self) -> None:
        self._raw_channel.close()

    def call(self, method: str, request) -> None:
        try:
            getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.RpcError:
            pass  # already reported as a failure by the interceptor


class SearchUser(RerankdUser):
    """Two-stage retrieval: the main traffic."""

    weight = 3

    @task
    def search(self) -> None:
        self.call("Search", self.payloads.search())


class ScoreUser(RerankdUser):
    """Rerank a caller-supplied candidate list (--candidates corpus documents)."""

    weight = 2

    @task
    def score(self) -> None:
        self.call("Score", self.payloads.score())


class EncodeUser(RerankdUser):
    """Embed a batch of corpus documents (--encode-batch)."""

    weight = 1

    @task
    def encode(self) -> None:
        self.call("Encode", self.payloads.encode())
