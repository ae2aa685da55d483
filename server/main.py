"""`autojudge-serve`: the composition root. Settings (flags, env, file) -> load models and heads through the
engine's `build_engine` -> `create_app` -> uvicorn, with a graceful shutdown on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import uvicorn
from starlette.types import ASGIApp

from engine import EngineClient, StepStats, build_engine, draft_name
from server.app import create_app
from server.loading import Deferred
from server.metrics import ServerMetrics
from server.settings import Settings, load_settings
from server.steplog import StepLog

log = logging.getLogger("autojudge.server")


class GracefulServer(uvicorn.Server):
    """Before the models have loaded (`client` None) a signal is uvicorn's own. After, the first SIGINT/SIGTERM
    turns /ready 503 at once; `drain_grace` seconds later (time for a balancer's health checks to take the
    replica out) it stops admitting: new requests get 503 while the listener stays open, in-flight requests get
    up to `drain_timeout` seconds to finish and the rest are aborted (a stream ends with an error event and
    [DONE]); then uvicorn closes connections and runs the lifespan shutdown. A further signal is uvicorn's: stop
    waiting, and on a third SIGINT force the exit."""

    def __init__(
        self, config: uvicorn.Config, client: EngineClient | None, drain_timeout: float, drain_grace: float = 0.0
    ) -> None:
        super().__init__(config)
        self.client = client
        self.drain_timeout = drain_timeout
        self.drain_grace = drain_grace
        self.signalled_at: float | None = None  # first SIGINT/SIGTERM: /ready is 503 from then on
        self.drained: asyncio.Task[None] | None = None

    @property
    def draining(self) -> bool:
        return self.signalled_at is not None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining or self.client is None:
            super().handle_exit(sig, frame)
            return
        self.signalled_at = time.monotonic()
        if self.drain_grace > 0:
            log.info("draining: /ready is 503; admitting requests for %.1f s more", self.drain_grace)
        else:
            self.client.stop_accepting()  # at once, not at the next tick

    async def on_tick(self, counter: int) -> bool:
        # NOTE: the drain starts here, on the event loop, rather than in the signal handler.
        if (
            self.signalled_at is not None
            and self.drained is None
            and self.client is not None
            and time.monotonic() >= self.signalled_at + self.drain_grace
        ):
            log.info("draining: up to %.1f s for in-flight requests", self.drain_timeout)
            self.client.stop_accepting()
            self.drained = asyncio.create_task(self.client.drain(self.drain_timeout))
        should_exit = await super().on_tick(counter)
        return should_exit or (self.drained is not None and self.drained.done())


def serve(settings: Settings) -> None:
    """Listen at once (503 while loading, see `Deferred`), load the models in a thread, then serve."""
    failure: list[BaseException] = []
    metrics: list[ServerMetrics] = []  # set once the models are loaded; the engine does not step before
    mb = settings.step_log_max_mb
    cap = max(1, int(mb * (1 << 20))) if mb else 0  # a tiny cap still rotates; 0 never does
    step_log = StepLog(Path(settings.step_log), max_bytes=cap) if settings.step_log else None

    def on_step(stats: StepStats) -> None:
        metrics[0].observe_step(stats)
        if step_log is not None:
            step_log.write(stats)

    def load() -> ASGIApp:
        draft = draft_name(settings.pair, settings.target, settings.draft) or "none"
        log.info("loading models (pair %s, target %s, draft %s) ...", settings.pair, settings.target, draft)
        loaded = build_engine(settings.model_source(), settings.engine_config(), on_step)
        log.info("loaded %s in %.1f s", loaded.summary, loaded.seconds)
        metrics.append(ServerMetrics(loaded.info, loaded.client.load, vllm_names=settings.vllm_metrics))
        server.client = loaded.client
        log.info("serving %s on http://%s:%d", loaded.info.model_name, settings.host, settings.port)
        return create_app(loaded.client, settings, loaded.tokenizer, metrics[0], draining=lambda: server.draining)

    def on_failure(e: BaseException) -> None:
        failure.append(e)
        server.should_exit = True

    config = uvicorn.Config(
        Deferred(load, on_failure),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=max(int(settings.shutdown_timeout), 1),
    )
    server = GracefulServer(config, None, settings.shutdown_timeout, settings.drain_grace)
    try:
        server.run()
    finally:
        if step_log is not None:
            step_log.close()
    if failure:
        raise failure[0]
    if not server.started:  # uvicorn logged why (port in use) and returned
        raise RuntimeError("the server did not start")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(sys.argv[1:] if argv is None else argv, os.environ)
    except (ValueError, OSError) as e:
        print(f"autojudge-serve: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(settings)
    except KeyboardInterrupt:
        return 0  # uvicorn re-raises a second SIGINT once its shutdown has completed
    except Exception as e:  # a start-up failure (missing model, bad head, no memory): say what, exit non-zero
        log.error("start-up failed: %s: %s", type(e).__name__, e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
