"""Loopback load test of the policy server: K clients x R requests, each client a thread with
openpi's own WebsocketClientPolicy (or a minimal client of ours when openpi-client is not
installed). Checks what must hold under load — no errors, every reply tagged with its own
client, no snapshot id (prefix K/V) shared by two clients — and reports latency figures."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .protocol import packb, unpackb, ws_url


class MiniClient:
    """The same calls as openpi_client.WebsocketClientPolicy, for machines without it."""

    def __init__(self, host: str, port: int):
        from websockets.sync.client import connect

        self._ws = connect(ws_url(host, port), compression=None, max_size=None)
        self._meta = unpackb(self._ws.recv())

    def get_server_metadata(self) -> dict:
        return self._meta

    def infer(self, obs: dict) -> dict:
        self._ws.send(packb(obs))
        r = self._ws.recv()
        if isinstance(r, str):
            raise RuntimeError(f"Error in inference server:\n{r}")
        return unpackb(r)

    def close(self) -> None:
        self._ws.close()


def make_client(host: str, port: int, prefer_openpi: bool = True):
    if prefer_openpi:
        try:
            from openpi_client.websocket_client_policy import WebsocketClientPolicy

            return WebsocketClientPolicy(host, port)
        except ImportError:
            pass
    return MiniClient(host, port)


def close_client(c) -> None:
    ws = getattr(c, "_ws", None)  # openpi's client has no close(); its socket is _ws
    if ws is not None:
        ws.close()


class ObsStream:
    """A slowly drifting synthetic scene per client (so a similarity gate has something to
    reuse), with a scene change every `scene_every` steps. Keys and state size are the server's
    (`from_metadata`): the Meta-World ones by default."""

    def __init__(self, seed: int, size: int = 128, state_dim: int = 4, scene_every: int = 50,
                 image_keys: tuple[str, ...] = ("observation/image", "observation/wrist_image"),
                 state_key: str = "observation/state", prompt_key: str = "prompt"):
        self.rng = np.random.default_rng(seed)
        self.size, self.state_dim, self.scene_every = size, state_dim, scene_every
        self.image_keys, self.state_key, self.prompt_key = tuple(image_keys), state_key, prompt_key
        self.prompt = f"task {seed}: pick up the puck"
        self._scene()

    @classmethod
    def from_metadata(cls, seed: int, size: int, meta: dict) -> ObsStream:
        """The observation the server's robot takes, as its metadata on connect names it."""
        keys = {k: meta[k] for k in ("image_keys", "state_key", "state_dim", "prompt_key") if k in meta}
        return cls(seed, size, **keys)

    def _scene(self) -> None:
        s = self.size
        self.images = {k: self.rng.integers(0, 256, (s, s, 3)).astype(np.float32) for k in self.image_keys}
        self.state = self.rng.standard_normal(self.state_dim).astype(np.float32)

    def obs(self, step: int) -> dict:
        if step and step % self.scene_every == 0:
            self._scene()
        jitter = self.rng.normal(0, 2.0, (self.size, self.size, 3)).astype(np.float32)
        self.state += self.rng.normal(0, 0.01, self.state_dim).astype(np.float32)
        return {**{k: np.clip(im + jitter, 0, 255).astype(np.uint8) for k, im in self.images.items()},
                self.state_key: self.state.copy(), self.prompt_key: self.prompt}


@dataclass
class ClientResult:
    index: int
    latency_ms: list[float] = field(default_factory=list)
    timings: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def run_load(host: str, port: int, clients: int = 8, requests: int = 200, image_size: int = 128,
             prefer_openpi: bool = True, timeout_s: float = 600.0) -> dict:
    """Run the load; returns a summary dict (see `check`). Each client: connect, R requests, close."""
    results = [ClientResult(i) for i in range(clients)]
    start = threading.Barrier(clients)
    deadline = time.monotonic() + timeout_s

    def client_main(res: ClientResult) -> None:
        try:
            c = make_client(host, port, prefer_openpi)
        except Exception as e:  # noqa: BLE001 - reported in the summary
            res.errors.append(f"connect: {e!r}")
            start.abort()
            return
        stream = ObsStream.from_metadata(1000 + res.index, image_size, c.get_server_metadata())
        try:
            start.wait(timeout=60)
            for step in range(requests):
                if time.monotonic() > deadline:
                    res.errors.append("timeout")
                    break
                obs = stream.obs(step)
                t0 = time.perf_counter()
                try:
                    r = c.infer(obs)
                except RuntimeError as e:
                    res.errors.append(str(e)[:200])
                    continue
                res.latency_ms.append((time.perf_counter() - t0) * 1e3)
                if np.asarray(r["actions"]).ndim != 2:
                    res.errors.append(f"actions of shape {np.asarray(r['actions']).shape}")
                res.timings.append(r["server_timing"])
        except Exception as e:  # noqa: BLE001
            res.errors.append(repr(e)[:200])
        finally:
            close_client(c)

    threads = [threading.Thread(target=client_main, args=(r,), daemon=True) for r in results]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic()))
    wall = time.perf_counter() - t0
    return summarize(results, wall)


def summarize(results: list[ClientResult], wall_s: float) -> dict:
    lat = [x for r in results for x in r.latency_ms]
    infer = [t["infer_ms"] for r in results for t in r.timings]
    queue = [t["queue_ms"] for r in results for t in r.timings]
    reuse = [t["reuse"] for r in results for t in r.timings]
    owners: dict[int, set[int]] = {}  # snapshot id -> server client ids that used it
    client_ids = []
    for r in results:
        ids = {t["reuse"]["client"] for t in r.timings}
        client_ids.append(ids)
        for t in r.timings:
            for s in t["reuse"]["snapshots"]:
                owners.setdefault(s, set()).add(t["reuse"]["client"])
    pct = lambda v, q: float(np.percentile(v, q)) if v else float("nan")  # noqa: E731
    return {
        "clients": len(results),
        "replies": len(lat),
        "errors": [e for r in results for e in r.errors],
        "wall_s": wall_s,
        "throughput_rps": len(lat) / wall_s if wall_s > 0 else 0.0,
        "latency_ms": {"p50": pct(lat, 50), "p99": pct(lat, 99), "max": max(lat, default=float("nan"))},
        "infer_ms": {"p50": pct(infer, 50), "p99": pct(infer, 99)},
        "queue_ms": {"p50": pct(queue, 50), "p99": pct(queue, 99)},
        "reuse_rate": sum(x["decision"] == "reuse" for x in reuse) / len(reuse) if reuse else 0.0,
        "mixed_steps": sum(bool(x["mixed"]) for x in reuse),
        "snapshots": len(owners),
        "replies_with_snapshots": sum(bool(x["snapshots"]) for x in reuse),
        "shared_snapshots": sorted(s for s, o in owners.items() if len(o) > 1),
        "client_ids": client_ids,  # per client thread: the server ids seen in its replies (one each)
    }


def check(summary: dict, requests_per_client: int) -> list[str]:
    """What must hold after a load run; empty when all is well."""
    problems = []
    if summary["errors"]:
        problems.append(f"{len(summary['errors'])} errors, first: {summary['errors'][0]}")
    expected = summary["clients"] * requests_per_client
    if summary["replies"] != expected:
        problems.append(f"{summary['replies']} replies, expected {expected}")
    ids = summary["client_ids"]
    if any(len(s) != 1 for s in ids) or len(set().union(*ids)) != len(ids):
        problems.append(f"replies not tagged one server client per connection: {ids}")
    if summary["replies_with_snapshots"] != summary["replies"]:
        problems.append(f"only {summary['replies_with_snapshots']} of {summary['replies']} replies name their snapshots")
    if summary["shared_snapshots"]:
        problems.append(f"snapshot ids used by more than one client: {summary['shared_snapshots'][:10]}")
    return problems


def format_summary(s: dict) -> str:
    lat, inf, q = s["latency_ms"], s["infer_ms"], s["queue_ms"]
    return (
        f"{s['clients']} clients, {s['replies']} replies in {s['wall_s']:.1f} s ({s['throughput_rps']:.1f} req/s), "
        f"{len(s['errors'])} errors\n"
        f"round trip ms: p50 {lat['p50']:.1f}  p99 {lat['p99']:.1f}  max {lat['max']:.1f}\n"
        f"server infer ms: p50 {inf['p50']:.1f}  p99 {inf['p99']:.1f};  queue wait ms: p50 {q['p50']:.1f}  p99 {q['p99']:.1f}\n"
        f"reuse rate {s['reuse_rate']:.2f}, mixed-snapshot steps {s['mixed_steps']}, {s['snapshots']} snapshot ids, "
        f"{len(s['shared_snapshots'])} shared across clients"
    )
