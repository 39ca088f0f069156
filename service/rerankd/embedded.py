"""Run a real rerankd server in a background thread (tests, `rerankd eval`/`bench` without --target)."""

from __future__ import annotations

import asyncio
import threading

from .config import Settings
from .server import App, create_server, shutdown


class EmbeddedServer:
    """``with EmbeddedServer(settings) as srv: Client(srv.target)`` — binds 127.0.0.1:0 by default."""

    def __init__(self, settings: Settings, *, ready_timeout: float = 600.0, span_processor=None) -> None:
        """``span_processor``: trace into it (an OpenTelemetry span processor; see create_server)."""
        if settings.server.listen == "[::]:50051":
            settings = settings.replace(server={"listen": "127.0.0.1:0"})
        self.settings = settings
        self.ready_timeout = ready_timeout
        self.span_processor = span_processor
        self.port = 0
        self.app: App | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._server = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> "EmbeddedServer":
        self._thread = threading.Thread(target=self._run, name="rerankd-embedded", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise self._error
        if wait_ready:
            try:
                self.wait_ready()
            except BaseException:
                self.stop(grace=0)  # never leak a bound server when models fail to load
                raise
        return self

    def wait_ready(self) -> None:
        assert self._loop is not None and self.app is not None
        asyncio.run_coroutine_threadsafe(self.app.wait_ready(self.ready_timeout), self._loop).result()

    def call(self, coro_fn, *args):
        """Run ``coro_fn(*args)`` on the server's loop (e.g. ``srv.call(srv.app.pipeline.flush)``)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro_fn(*args), self._loop).result()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            try:
                self._server, self.port, self.app = await create_server(self.settings, span_processor=self.span_processor)
            except BaseException as e:  # surfaced by start()
                self._error = e
            finally:
                self._started.set()

        loop.run_until_complete(boot())
        if self._error is None:
            loop.run_forever()
        loop.close()

    def stop(self, grace: float = 1.0) -> None:
        if self._loop is None or self._server is None or self.app is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(shutdown(self._server, self.app, grace), self._loop).result(timeout=120)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=30)

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
