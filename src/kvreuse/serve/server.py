"""Websocket policy server speaking openpi's protocol, one Policy (and reuse state) per client.

Protocol (what openpi_client.WebsocketClientPolicy expects; see docs/SERVE.md):
  - on connect the server sends one binary frame: the metadata map;
  - each binary frame from the client is a msgpack map: an observation, answered with
    {"actions": (chunk, action_dim) array, "server_timing": {...}}, or a control message
    {"__ctrl__": "reset" | "episode_start" | "episode_end"} (each clears the client's state),
    answered with {"__ack__": name};
  - any bad frame is answered with a short text frame "error: ..."; the connection stays open
    (openpi's client turns a text frame into a RuntimeError). Only a frame above the hard size
    cap closes the connection (code 1009), because it cannot be skipped without buffering it.
  - HTTP GET /healthz -> "OK", GET /stats -> JSON of per-client and total reuse statistics.

Concurrency: an asyncio front end; every model call goes through one bounded queue to one
inference thread. A full queue makes handlers wait before reading their next frame
(backpressure reaches the clients through TCP). Jobs of clients that left are skipped.
"""

from __future__ import annotations

import asyncio
import errno
import http
import json
import logging
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ..policy import Policy
from .protocol import ProtocolError, packb, parse_request, unpackb, ws_url
from .session import ClientSession, ClientStats

log = logging.getLogger("kvreuse.serve")

RESET_KEY = "reset"
CONTROL_KEY = "__ctrl__"
CONTROLS = ("reset", "episode_start", "episode_end")  # the last two: the names some openpi forks send
_MB = 1 << 20
STOP_GRACE_S = 10.0  # on stop, replies under way get this long to go out before the connections close
_PORT_TRIES = 5


def bind_like_asyncio(family: int, proto: int, addr: tuple) -> socket.socket:
    """A TCP socket bound to `addr` with the options asyncio's server sets: SO_REUSEADDR, and IPv6
    only (beside any IPv4 socket on the same port)."""
    s = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(addr)
    except BaseException:
        s.close()
        raise
    return s


def common_free_port(host: str, tries: int = 20) -> int:
    """A port free on every address `host` resolves to, or 0 where it resolves to one (the OS
    picks at bind). asyncio binds each address on its own: with port 0 a dual-stack `localhost`
    got one port for 127.0.0.1 and another for ::1, and a client on the other family was refused."""
    infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addrs = list(dict.fromkeys((family, proto, addr) for family, _, proto, _, addr in infos))
    if len(addrs) < 2:
        return 0
    for _ in range(tries):
        port, held = 0, []
        try:  # the first address's free port, then the same port on the others
            for family, proto, addr in addrs:
                held.append(bind_like_asyncio(family, proto, (addr[0], port, *addr[2:])))
                port = held[-1].getsockname()[1]
            return port
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
        finally:
            for s in held:
                s.close()
    raise OSError(errno.EADDRINUSE, f"no port free on all of {', '.join(str(a[2][0]) for a in addrs)} "
                                    f"after {tries} tries; pass --port")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # Frames above this get an error reply; the connection stays usable.
    max_frame_mb: float = 16.0
    # Frames above this close the connection (1009): websockets must buffer a frame to skip it.
    close_frame_mb: float = 128.0
    # Jobs waiting for the inference thread; when full, clients wait (backpressure).
    queue_size: int = 16
    max_clients: int = 64
    # A prefix cache older than this is never reused (openpi's client never resets between episodes).
    max_cache_age_s: float = 5.0
    # Rows one request may batch: every image is resized to the model's size, so a tiny frame of many
    # small images (or a video clip sent by mistake) would otherwise hold the model and memory for long.
    max_batch: int = 8
    max_error_chars: int = 300

    def __post_init__(self) -> None:
        for name in ("max_frame_mb", "close_frame_mb"):  # sizes in bytes are ints: inf is no size
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} (--{name.replace('_', '-')}): expected a finite number of MiB, "
                                 f"got {getattr(self, name)}")
        if not 0 < self.max_frame_mb <= self.close_frame_mb:
            raise ValueError(f"max_frame_mb: expected 0 < max_frame_mb <= close_frame_mb, got {self.max_frame_mb} "
                             f"and {self.close_frame_mb}")
        if self.queue_size < 1 or self.max_clients < 1 or self.max_batch < 1:
            raise ValueError(f"queue_size, max_clients and max_batch: expected >= 1, got {self.queue_size}, "
                             f"{self.max_clients}, {self.max_batch}")
        if not self.max_cache_age_s > 0:
            raise ValueError(f"max_cache_age_s: expected seconds > 0 (inf for no bound), got {self.max_cache_age_s}")


class _ClientGone(Exception):
    """The client closed its connection before its reply was ready."""


class _Job:
    __slots__ = ("fn", "future", "submitted", "started")

    def __init__(self, fn: Callable[[], Any], future: asyncio.Future):
        self.fn, self.future = fn, future
        self.submitted, self.started = time.perf_counter(), 0.0

    def run(self) -> Any:
        self.started = time.perf_counter()
        return self.fn()


class PolicyServer:
    """`new_policy()` makes one client's Policy (they may share one model: calls are serialized
    on the inference thread). `policy_bounds_age` says the policies enforce
    `max_cache_age_s` themselves (their reuse config's max age); otherwise the server resets a
    client whose cache is older."""

    def __init__(
        self,
        new_policy: Callable[[], Policy],
        config: ServeConfig = ServeConfig(),
        metadata: dict | None = None,
        policy_bounds_age: bool = False,
    ):
        self.new_policy = new_policy
        self.cfg = config
        self.policy_bounds_age = policy_bounds_age
        self.metadata = {
            **(metadata or {}),
            "server": "kvreuse",
            "reset_key": RESET_KEY,
            "controls": list(CONTROLS),
            "max_frame_bytes": int(config.max_frame_mb * _MB),
            "max_cache_age_s": config.max_cache_age_s,
        }
        self.clients: dict[int, ClientSession] = {}
        self.closed_totals = ClientStats()  # counters of the clients that left
        self.latency_ms: deque = ClientStats().latency_ms  # the last requests of every client, in order
        self.clients_served = 0
        self.started = time.monotonic()
        self.port: int | None = None
        self.addresses: list[str] = []  # what the host resolved to: every one listens on self.port
        self.connected_at_stop = 0
        self._queue: asyncio.Queue[_Job] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._busy = False
        self._stopping = False
        self._replying = 0  # requests read and not yet answered

    # ---- lifecycle --------------------------------------------------------------------------
    async def run(self, ready: Callable[[int], None] | None = None, stop: asyncio.Event | None = None) -> None:
        self._queue = asyncio.Queue(maxsize=self.cfg.queue_size)
        self._stopping = False
        # per run: the last run's was shut down (a server run again failed every inference)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kvreuse-infer")
        worker = asyncio.create_task(self._worker())
        try:
            for attempt in range(_PORT_TRIES):
                port = self.cfg.port or common_free_port(self.cfg.host)
                try:
                    server = await serve(
                        self._handler,
                        self.cfg.host,
                        port,
                        compression=None,
                        max_size=int(self.cfg.close_frame_mb * _MB),
                        max_queue=4,  # frames buffered per connection before TCP backpressure
                        process_request=self._http,
                    )
                    break
                except OSError as e:  # a port picked for several addresses was taken before the bind
                    if self.cfg.port or e.errno != errno.EADDRINUSE or attempt == _PORT_TRIES - 1:
                        raise
            async with server:
                self.port = server.sockets[0].getsockname()[1]
                self.addresses = [s.getsockname()[0] for s in server.sockets]
                log.info("serving on %s (%s; healthz, stats on the same port)", ws_url(self.cfg.host, self.port),
                         ", ".join(self.addresses))
                if ready is not None:
                    ready(self.port)
                try:
                    if stop is None:
                        await server.serve_forever()
                    else:
                        await stop.wait()
                finally:  # leaving the block closes these connections with 1001 (going away)
                    self.connected_at_stop = len(self.clients)
                    await self._drain()
        finally:
            worker.cancel()
            self._executor.shutdown(wait=True, cancel_futures=True)

    async def _drain(self) -> None:
        """On stop: no new connection or request; those read already are answered (up to STOP_GRACE_S),
        so a robot gets the chunk it asked for before its connection closes."""
        self._stopping = True
        t_end = time.monotonic() + STOP_GRACE_S
        while self._replying and time.monotonic() < t_end:
            await asyncio.sleep(0.01)
        if self._replying:
            log.warning("stopping with %d replies unsent after %.0f s", self._replying, STOP_GRACE_S)

    # ---- HTTP endpoints (before the websocket handshake) -------------------------------------
    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":  # a stopping server takes no one: a load balancer should look elsewhere
            if self._stopping:
                return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "stopping\n")
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if path == "/stats":
            resp = connection.respond(http.HTTPStatus.OK, json.dumps(self.stats()) + "\n")
            del resp.headers["Content-Type"]
            resp.headers["Content-Type"] = "application/json"
            return resp
        if "websocket" not in request.headers.get("Upgrade", "").lower():  # plain HTTP elsewhere: not 426
            return connection.respond(http.HTTPStatus.NOT_FOUND,
                                      f"no such page {path!r}: GET /healthz or /stats, or open a websocket\n")
        if len(self.clients) >= self.cfg.max_clients:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "server full: too many clients\n")
        if self._stopping:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "server stopping\n")
        return None  # go on with the websocket handshake

    def stats(self) -> dict:
        totals = ClientStats()
        totals.add(self.closed_totals)
        for s in list(self.clients.values()):
            totals.add(s.stats)
        totals.latency_ms = self.latency_ms
        return {
            "uptime_s": round(time.monotonic() - self.started, 3),
            "queue": {"waiting": self._queue.qsize() if self._queue else 0, "max": self.cfg.queue_size,
                      "busy": self._busy},
            "clients_connected": len(self.clients),
            "clients_served": self.clients_served,
            "totals": totals.summary(),
            "clients": [s.summary() for s in list(self.clients.values())],
        }

    # ---- inference worker --------------------------------------------------------------------
    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self._queue.get()
            try:
                if job.future.done():  # cancelled: its client left while it waited, skip the work
                    continue
                self._busy = True
                try:
                    result = await loop.run_in_executor(self._executor, job.run)
                except Exception as e:  # noqa: BLE001 - handed to the handler, which replies
                    if not job.future.done():
                        job.future.set_exception(e)
                else:
                    if not job.future.done():
                        job.future.set_result(result)
                finally:
                    self._busy = False
            finally:
                self._queue.task_done()

    async def _submit(self, ws: ServerConnection, fn: Callable[[], Any]) -> tuple[Any, _Job]:
        job = _Job(fn, asyncio.get_running_loop().create_future())
        await self._queue.put(job)  # waits while the queue is full: backpressure
        # Watch the connection while the job waits or runs: a client that leaves gets its queued
        # job cancelled (the worker skips it) instead of holding up the others.
        closed = asyncio.ensure_future(ws.wait_closed())
        try:
            await asyncio.wait((job.future, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        if not job.future.done():
            job.future.cancel()
            raise _ClientGone
        return job.future.result(), job

    # ---- one connection ----------------------------------------------------------------------
    async def _handler(self, ws: ServerConnection) -> None:
        remote = "%s:%s" % tuple(ws.remote_address[:2]) if ws.remote_address else "?"
        session = ClientSession(self.new_policy(), remote, self.cfg.max_cache_age_s, self.policy_bounds_age,
                                self.latency_ms)
        self.clients[session.id] = session
        self.clients_served += 1
        log.info("client %d (%s) connected", session.id, remote)
        try:
            await ws.send(packb(self.metadata))
            prev_total_ms = None
            while True:
                frame = await ws.recv()
                if self._stopping:  # read during the stop: the connection closes unanswered (1001)
                    await ws.wait_closed()
                    break
                t0 = time.perf_counter()
                self._replying += 1
                try:
                    await ws.send(await self._reply(ws, session, frame, t0, prev_total_ms))
                except ConnectionClosed:
                    raise _ClientGone from None
                finally:
                    self._replying -= 1
                prev_total_ms = (time.perf_counter() - t0) * 1e3
        except _ClientGone:
            session.stats.abandoned += 1
        except ConnectionClosed:
            pass
        finally:
            self.clients.pop(session.id, None)
            self.closed_totals.add(session.stats)
            log.info("client %d (%s) left after %d requests", session.id, remote, session.stats.requests)

    async def _reply(self, ws: ServerConnection, session: ClientSession, frame, t0: float,
                     prev_total_ms) -> bytes | str:
        """The answer to one frame: actions, an ack, or one `error:` line (the connection goes on)."""
        try:
            return await self._answer(ws, session, frame, t0, prev_total_ms)
        except _ClientGone:
            raise
        except (ProtocolError, ValueError) as e:
            session.stats.errors += 1
            return self._error(str(e))
        except Exception as e:  # noqa: BLE001 - a bug or a model failure: log it, keep serving
            session.stats.errors += 1
            log.exception("client %d: inference failed", session.id)
            return self._error(f"internal error during inference ({type(e).__name__}); see server log")

    def _error(self, msg: str) -> str:
        msg = " ".join(msg.split())  # one line
        n = self.cfg.max_error_chars
        return "error: " + (msg if len(msg) <= n else msg[: n - 3] + "...")

    async def _answer(self, ws: ServerConnection, session: ClientSession, frame: bytes | str, t0: float, prev_total_ms) -> bytes:
        if isinstance(frame, str):
            raise ProtocolError("expected a binary msgpack frame, got a text frame")
        limit = self.cfg.max_frame_mb * _MB
        if len(frame) > limit:
            raise ProtocolError(f"frame of {len(frame)} bytes exceeds the limit of {int(limit)} bytes "
                                f"({self.cfg.max_frame_mb:g} MiB)")
        req = parse_request(unpackb(frame))

        if CONTROL_KEY in req:
            ctrl = req[CONTROL_KEY]
            if not isinstance(ctrl, str) or ctrl not in CONTROLS:  # (an array's `in` raised numpy's error)
                raise ProtocolError(f"unknown control message {str(ctrl)[:40]!r}; expected one of {list(CONTROLS)}")
            # episode_end too: the next episode's first frame must not reuse this one's K/V
            await self._submit(ws, session.reset)
            return packb({"__ack__": ctrl})

        self._check_batch(session, req)
        reset = req.pop(RESET_KEY, False)
        if not (isinstance(reset, (bool, np.bool_)) or (isinstance(reset, int) and reset in (0, 1))):
            raise ProtocolError(f"{RESET_KEY}: expected a bool, got {type(reset).__name__}")
        (actions, rec), job = await self._submit(ws, lambda: session.infer(req, bool(reset)))
        done = time.perf_counter()
        server_ms = (done - t0) * 1e3
        timing = {
            "infer_ms": (done - job.started) * 1e3,
            "queue_ms": (job.started - job.submitted) * 1e3,
            "server_ms": server_ms,
            "policy_ms": {k: float(v) for k, v in rec.timings.items()},
            "reuse": session.record(rec, server_ms),
        }
        if prev_total_ms is not None:
            timing["prev_total_ms"] = prev_total_ms
        return packb({"actions": np.asarray(actions), "server_timing": timing})


    def _check_batch(self, session: ClientSession, req: dict) -> None:
        """At most max_batch rows in the state (2-D) and in each camera's images (4-D), before the
        transform resizes them; a shape that is none of these is the transform's to name."""
        transform = getattr(session.policy, "transform", None)
        if transform is None:
            return
        spec = transform.spec
        for key, ndim in ((spec.state_key, 2), *((k, 4) for k in spec.camera_keys)):
            if key in spec.camera_keys and key in req and not isinstance(req[key], np.ndarray):
                # the transform refuses it too, but np.ndim of a big nested list took seconds on the loop
                raise ProtocolError(f"{key}: expected an array (msgpack-numpy), got {type(req[key]).__name__}")
            try:
                rows = np.shape(req[key])[0] if key in req and np.ndim(req[key]) == ndim else 1
            except ValueError:  # a ragged list
                continue
            if rows > self.cfg.max_batch:
                raise ProtocolError(f"{key}: a batch of {rows} observations exceeds the limit of "
                                    f"{self.cfg.max_batch} (--max-batch)")


class ServerThread:
    """Runs a PolicyServer on its own event loop in a daemon thread (tests, load scripts).

    with ServerThread(server) as port: ...   # bound port (use port=0 in the config for a free one)
    """

    def __init__(self, server: PolicyServer, timeout_s: float = 30.0):
        self.server, self.timeout_s = server, timeout_s
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="kvreuse-serve", daemon=True)

    def _main(self) -> None:
        async def main():
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await self.server.run(ready=lambda port: self._ready.set(), stop=self._stop)

        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - reported to the starting thread
            self._error = e
            self._ready.set()

    def __enter__(self) -> int:
        self._thread.start()
        if not self._ready.wait(self.timeout_s) or self._error is not None:
            raise RuntimeError(f"policy server did not start: {self._error!r}")
        return self.server.port

    def __exit__(self, *exc) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(self.timeout_s)
