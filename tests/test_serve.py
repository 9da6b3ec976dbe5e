"""Policy server: openpi wire format, openpi's own client, per-client state, bad frames, load.

openpi's client comes from PyPI (it pins numpy<2, which its code does not need):
    pip install --no-deps openpi-client==0.1.2
Tests that need it are skipped without it; everything else uses a raw websocket.
Only loopback addresses; every loop is bounded.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import msgpack
import numpy as np
import pytest
import torch
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from kvreuse.policy import StepRecord
from kvreuse.reuse.config import ReuseConfig
from kvreuse.serve.command import build_policy, make_server, with_age_bound
from kvreuse.serve.load import ObsStream, check, format_summary, run_load
from kvreuse.serve.protocol import ProtocolError, packb, unpackb
from kvreuse.serve.server import PolicyServer, ServeConfig, ServerThread

HOST = "127.0.0.1"
# websockets >= 16 asks for `with connect(...)`; openpi's client (and these tests) hold the socket open.
pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used:DeprecationWarning")


# ---- helpers -----------------------------------------------------------------------------------
def good_obs(seed: int = 0, size: int = 64) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "observation/image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "observation/state": rng.standard_normal(4).astype(np.float32),
        "prompt": "pick up the puck",
    }


def real_server(reuse: ReuseConfig | None = None, **cfg) -> PolicyServer:
    """The tiny random model behind the real server wiring (`kvreuse serve` minus the CLI)."""
    config = ServeConfig(port=0, **cfg)
    template = _TEMPLATE[0].fork(reuse=with_age_bound(reuse or ReuseConfig(), config.max_cache_age_s))
    return make_server(template, _TEMPLATE[1], config)


class RawClient:
    """A websocket speaking the wire format directly, to send frames openpi's client cannot."""

    def __init__(self, port: int):
        self.ws = connect(f"ws://{HOST}:{port}", compression=None, max_size=None, open_timeout=10)
        self.meta = unpackb(self.ws.recv(timeout=10))

    def send(self, data, timeout: float = 30):
        self.ws.send(data)
        r = self.ws.recv(timeout=timeout)
        return r if isinstance(r, str) else unpackb(r)

    def infer(self, obs: dict):
        return self.send(packb(obs))

    def close(self):
        self.ws.close()


def http_get(port: int, path: str):
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=10) as r:
        return r.status, r.headers.get("Content-Type"), r.read()


class FakePolicy:
    """Duck-typed Policy: fixed actions, a chosen decision sequence, optional delay."""

    def __init__(self, delay_s: float = 0.0, decisions=("refresh",)):
        self.delay_s, self.decisions = delay_s, decisions
        self.calls = self.resets = 0

    def reset(self):
        self.resets += 1

    def infer(self, raw, reset: bool = False):
        if reset:
            self.reset()
        time.sleep(self.delay_s)
        d = self.decisions[min(self.calls, len(self.decisions) - 1)]
        self.calls += 1
        return np.zeros((4, 2), np.float32), StepRecord(decision=d, snapshots=(self.calls,))


_TEMPLATE: list = []


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    _TEMPLATE[:] = build_policy(None, ReuseConfig(), "tiny-pi05")
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def server_port():
    with ServerThread(real_server(max_frame_mb=1.0, close_frame_mb=4.0)) as port:
        yield port


# ---- wire format -------------------------------------------------------------------------------
def test_protocol_roundtrip_and_openpi_compat():
    obs = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.int64(7), "c": "x", "d": [1, 2.5],
           "e": np.zeros((0, 3), np.uint8), "f": np.array(True)}
    back = unpackb(packb(obs))
    assert back["a"].dtype == np.float32 and back["a"].shape == (2, 3) and (back["a"] == obs["a"]).all()
    assert back["b"] == 7 and back["b"].dtype == np.int64 and back["c"] == "x" and back["d"] == [1, 2.5]
    assert back["e"].shape == (0, 3) and back["f"].dtype == np.bool_
    back["a"][0, 0] = 1  # decoded arrays are writable copies
    msgpack_numpy = pytest.importorskip("openpi_client.msgpack_numpy")
    theirs = msgpack_numpy.unpackb(packb(obs))  # our frames decode with openpi's code
    assert (theirs["a"] == obs["a"]).all() and theirs["b"] == 7
    ours = unpackb(msgpack_numpy.packb(obs))  # and theirs with ours
    assert (ours["a"] == obs["a"]).all() and ours["a"].dtype == np.float32


@pytest.mark.parametrize(
    "frame, words",
    [
        (b"\xc1\xc1\xc1", "malformed"),
        (packb({"a": 1})[:-1], "malformed"),
        (packb({"a": 1}) + b"\x00", "malformed"),
        (msgpack.packb({b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]}), "not allowed"),
        (msgpack.packb({b"__ndarray__": True, b"data": b"\0" * 7, b"dtype": "<f4", b"shape": [2]}), "bytes"),
        (msgpack.packb({b"__ndarray__": True, b"data": b"", b"dtype": "nonsense", b"shape": [0]}), "dtype"),
        (msgpack.packb({b"__ndarray__": True, b"data": b"", b"dtype": "<f4", b"shape": [-1]}), "shape"),
        (msgpack.packb({1: 2}), "malformed"),
        # Strings, bytes and dates: no observation field takes them (numbers and bools only).
        *((msgpack.packb({b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": dt, b"shape": [1]}), "not allowed")
          for dt in ("<U2", "|S8", "<M8[s]", "<m8[s]")),
    ],
)
def test_protocol_rejects_malformed(frame, words):
    with pytest.raises(ProtocolError, match=words):
        unpackb(frame)


# ---- openpi's own client -----------------------------------------------------------------------
def test_openpi_client_end_to_end(server_port):
    wcp = pytest.importorskip("openpi_client.websocket_client_policy")
    client = wcp.WebsocketClientPolicy(HOST, server_port)
    try:
        meta = client.get_server_metadata()
        assert meta["server"] == "kvreuse" and meta["action_dim"] == 4 and meta["reset_key"] == "reset"
        r1 = client.infer(good_obs())
        assert r1["actions"].shape == (16, 4) and np.isfinite(r1["actions"]).all()
        t = r1["server_timing"]
        assert {"infer_ms", "queue_ms", "server_ms", "reuse"} <= set(t) and "prev_total_ms" not in t
        r2 = client.infer(good_obs())
        assert r2["server_timing"]["reuse"]["client"] == t["reuse"]["client"] and "prev_total_ms" in r2["server_timing"]
        assert r2["server_timing"]["reuse"]["step"] == 2
        # An error reply reaches openpi's client as a RuntimeError, without a traceback; the
        # same client then goes on working.
        with pytest.raises(RuntimeError, match="missing key") as e:
            client.infer({"prompt": "no images"})
        assert "Traceback" not in str(e.value)
        r3 = client.infer({**good_obs(), "reset": True})
        assert r3["server_timing"]["reuse"]["resets"] == 1 and r3["actions"].shape == (16, 4)
    finally:
        client._ws.close()


def test_reset_restarts_noise_and_control_message(server_port):
    """A reset clears the client's state: same observation after a reset -> same actions as
    the first call of a fresh connection (same noise seed), and the control message acks."""
    a, b = RawClient(server_port), RawClient(server_port)
    try:
        first = a.infer(good_obs(1))["actions"]
        second = a.infer(good_obs(1))["actions"]
        assert not np.array_equal(first, second)  # the noise generator moved on
        assert a.send(packb({"__ctrl__": "reset"})) == {"__ack__": "reset"}
        assert np.array_equal(a.infer(good_obs(1))["actions"], first)
        assert np.array_equal(b.infer(good_obs(1))["actions"], first)  # b's state is its own
        a.infer(good_obs(1))
        assert a.send(packb({"__ctrl__": "episode_end"})) == {"__ack__": "episode_end"}
        assert np.array_equal(a.infer(good_obs(1))["actions"], first)  # episode_end clears it too
    finally:
        a.close(), b.close()


def test_rejected_observation_with_reset_leaves_the_session_unchanged():
    from kvreuse.serve.session import ClientSession

    s = ClientSession(_TEMPLATE[0].fork(), "test", max_cache_age_s=60.0, policy_bounds_age=True)
    s.infer(good_obs(), reset=False)
    born, calls = s.cache_born, s.policy.runner.call_index
    bad = {**good_obs(), "observation/state": np.zeros(7, np.float32)}
    with pytest.raises(ValueError, match="observation/state"):
        s.infer(bad, reset=True)
    assert s.stats.resets == 0 and s.cache_born == born and s.policy.runner.call_index == calls == 1
    _, rec = s.infer(good_obs(), reset=True)  # a good one is still reset first
    assert s.stats.resets == 1 and s.policy.runner.call_index == 1 and rec.decision == "refresh"


# ---- bad frames --------------------------------------------------------------------------------
def _bad_frames():
    obs = good_obs()
    big = {**obs, "pad": np.zeros(int(1.5 * (1 << 20)), np.uint8)}  # over max_frame_mb=1, under close=4
    nan_state = {**obs, "observation/state": np.array([np.nan, 0, 0, 0], np.float32)}
    return {
        "garbage bytes": (b"\xc1\x00\xff", "malformed"),
        "truncated msgpack": (packb(obs)[:100], "malformed"),
        "text frame": ("hello", "text frame"),
        "not a map": (packb([1, 2, 3]), "map"),
        "missing keys": (packb({"prompt": "x"}), "missing key"),
        "unknown camera": (packb({**obs, "observation/left_image": obs["observation/image"]}), "unknown camera"),
        "wrong image shape": (packb({**obs, "observation/image": np.zeros((64, 64), np.uint8)}), "observation/image"),
        "wrong image dtype": (packb({**obs, "observation/image": np.zeros((64, 64, 3), np.int32)}), "dtype"),
        "wrong state shape": (packb({**obs, "observation/state": np.zeros(7, np.float32)}), "observation/state"),
        "nan state": (packb(nan_state), "NaN"),
        "object array": (msgpack.packb({"x": {b"__ndarray__": True, b"data": b"", b"dtype": "|O", b"shape": [0]}}), "not allowed"),
        "oversized frame": (packb(big), f"frame of {len(packb(big))} bytes exceeds the limit of 1048576 bytes"),
        "unknown control": (packb({"__ctrl__": "explode"}), "unknown control"),
        "array control": (packb({"__ctrl__": np.ones(2, np.int64)}), "unknown control"),
        # a big list image held the event loop (every client) for seconds before the transform refused it
        "image as a big nested list": (packb({**obs, "observation/image": np.zeros((200, 200, 3), np.uint8).tolist()}),
                                       "more than 65536 msgpack list items"),
        "image as a list": (packb({**obs, "observation/image": np.zeros((4, 4, 3), np.uint8).tolist()}),
                            "observation/image: expected an array (msgpack-numpy), got list"),
        "string as a bool scalar": (msgpack.packb({**{k: v for k, v in obs.items() if k == "prompt"},
                                                   "reset": {b"__npgeneric__": True, b"data": "no", b"dtype": "|b1"}}),
                                    "bad numpy scalar 'no' for dtype bool"),
        "bad reset flag": (packb({**obs, "reset": "yes"}), "reset"),
        "array reset flag": (packb({**obs, "reset": np.ones(2, bool)}), "reset"),
        "float image 0-255": (packb({**obs, "observation/image": obs["observation/image"].astype(np.float32)}),
                              "observation/image: float pixels must be in [0, 1]"),
        "empty image": (packb({**obs, "observation/image": np.zeros((0, 0, 3), np.uint8)}), "observation/image"),
        "string image": (packb({**obs, "observation/image": "abc"}), "observation/image"),
        "string state": (packb({**obs, "observation/state": "abcd"}), "observation/state"),
        "dict state": (packb({**obs, "observation/state": {"x": 1.0}}), "observation/state"),
        "prompt not a string": (packb({**obs, "prompt": 5}), "prompt"),
        "prompt nil": (packb({**obs, "prompt": None}), "prompt"),
        "missing prompt": (packb({k: v for k, v in obs.items() if k != "prompt"}), "missing key(s) ['prompt']"),
        "empty prompt": (packb({**obs, "prompt": ""}), "prompt: empty"),
        "empty state batch": (packb({**obs, "observation/state": np.zeros((0, 4), np.float32)}),
                              "observation/state: empty batch"),
        "state overflows": (packb({**obs, "observation/state": np.full(4, 1e300)}), "observation/state: out of range"),
    }


@pytest.mark.parametrize("kind", list(_bad_frames()))
def test_bad_frame_gets_short_error_then_connection_serves(server_port, kind):
    frame, words = _bad_frames()[kind]
    c = RawClient(server_port)
    try:
        reply = c.send(frame)
        assert isinstance(reply, str) and reply.startswith("error:"), reply
        assert words.lower() in reply.lower() and "internal error" not in reply and "Traceback" not in reply and len(reply) < 400 and "\n" not in reply
        good = c.infer(good_obs())
        assert isinstance(good, dict) and good["actions"].shape == (16, 4)
    finally:
        c.close()


def test_frame_over_hard_cap_closes_only_that_connection(server_port):
    other = RawClient(server_port)
    c = RawClient(server_port)
    try:
        c.ws.send(b"\0" * (5 << 20))  # over close_frame_mb=4
        with pytest.raises(ConnectionClosed) as e:
            c.ws.recv(timeout=10)
        assert e.value.rcvd is not None and e.value.rcvd.code == 1009
        assert other.infer(good_obs())["actions"].shape == (16, 4)
        fresh = RawClient(server_port)
        assert fresh.infer(good_obs())["actions"].shape == (16, 4)
        fresh.close()
    finally:
        other.close()


# ---- HTTP endpoints ----------------------------------------------------------------------------
def test_a_server_run_again_serves():
    """run() shut its inference thread pool down on the way out; a second run accepted clients and
    answered every observation with an internal error."""
    srv = real_server()
    for _ in range(2):
        with ServerThread(srv) as port:
            c = RawClient(port)
            try:
                assert np.asarray(c.infer(good_obs(1))["actions"]).ndim == 2
            finally:
                c.close()


def test_healthz_and_stats(server_port):
    assert http_get(server_port, "/healthz")[::2] == (200, b"OK\n")
    c = RawClient(server_port)
    try:
        c.infer(good_obs())
        c.infer(good_obs())
        c.send(b"\xc1")
        status, ctype, body = http_get(server_port, "/stats")
        assert status == 200 and ctype == "application/json"
        stats = json.loads(body)
        mine = [s for s in stats["clients"] if s["requests"] == 2 and s["errors"] == 1]
        assert len(mine) == 1 and mine[0]["latency_ms"]["p50"] > 0
        assert mine[0]["latency_ms"]["window"] + mine[0]["warmups"] == 2
        assert stats["totals"]["requests"] >= 1 and stats["queue"]["max"] == 16
    finally:
        c.close()


def test_other_http_paths_get_404(server_port):
    for path in ("/healthz/", "/foo", "/"):
        with pytest.raises(urllib.error.HTTPError) as e:
            http_get(server_port, path)
        assert e.value.code == 404 and b"/healthz" in e.value.read()
    c = RawClient(server_port)  # a websocket handshake is still served
    try:
        assert c.infer(good_obs())["actions"].shape == (16, 4)
    finally:
        c.close()


def test_age_resets_count_refreshes_the_policy_forced_for_age(monkeypatch):
    """`kvreuse serve` hands its max age to the reuse config: the policy refreshes, and the
    client's age_resets counts those refreshes."""
    from kvreuse.serve.session import ClientSession

    # A clock of our own: on a loaded machine two real calls can take longer than the max age.
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    policy = _TEMPLATE[0].fork(reuse=with_age_bound(ReuseConfig(gate="always"), 0.2))
    s = ClientSession(policy, "test", max_cache_age_s=0.2, policy_bounds_age=True)
    assert [s.infer(good_obs(), reset=False)[1].decision for _ in range(2)] == ["refresh", "reuse"]
    assert s.stats.age_resets == 0
    clock[0] += 0.3
    _, rec = s.infer(good_obs(), reset=False)
    assert rec.decision == "refresh" and rec.reason.startswith("max age exceeded") and s.stats.age_resets == 1


def test_serve_checks_address_and_threads_before_loading(monkeypatch, capsys):
    import socket

    from kvreuse.cli import main
    from kvreuse.serve import command

    monkeypatch.setattr(command, "build_policy", lambda *a, **k: pytest.fail("the model was built"))
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        for argv, msg in ((["--port", str(port)], f"--port {port}: cannot listen there: in use by another process"),
                          (["--port", "70000"], "--port 70000: expected 0 .. 65535"),
                          (["--host", "nosuchhost.invalid"], "--host 'nosuchhost.invalid': not an address"),
                          (["--threads", "0"], "--threads 0: expected an integer >= 1")):
            with pytest.raises(SystemExit) as e:
                main(["serve", *argv])
            err = capsys.readouterr().err.strip().splitlines()
            assert e.value.code == 2 and len(err) == 1 and msg in err[0], err


def test_max_clients_refused_with_503():
    with ServerThread(PolicyServer(FakePolicy, ServeConfig(port=0, max_clients=1))) as port:
        a = RawClient(port)
        try:
            with pytest.raises(InvalidStatus) as e:
                RawClient(port)
            assert e.value.response.status_code == 503
        finally:
            a.close()


def test_a_batch_over_max_batch_is_an_error_and_the_connection_goes_on():
    """A small frame of many small images (a video clip sent by mistake) held the model and GBs of memory."""
    def batch(n):
        one = good_obs(size=8)
        return {**{k: np.stack([one[k]] * n) for k in ("observation/image", "observation/wrist_image",
                                                        "observation/state")}, "prompt": one["prompt"]}

    with ServerThread(real_server(max_batch=2)) as port:
        c = RawClient(port)
        try:
            want = "error: observation/state: a batch of 3 observations exceeds the limit of 2 (--max-batch)"
            assert c.infer(batch(3)) == want
            assert c.infer(batch(2))["actions"].shape[0] == 2
            clip = {**good_obs(size=8), "observation/image": batch(3)["observation/image"]}  # one state, 3 frames
            assert c.infer(clip) == want.replace("observation/state", "observation/image")
            ragged = c.infer({**good_obs(), "observation/state": [[1.0, 2.0, 3.0, 4.0], [1.0]]})
            assert ragged.startswith("error: observation/state: "), ragged  # still the transform's named error
            assert c.infer(good_obs())["actions"].ndim == 2
        finally:
            c.close()
    with pytest.raises(ValueError, match="max_batch"):
        ServeConfig(max_batch=0)


def test_a_stop_sends_the_reply_under_way_before_closing():
    """The stop used to close every connection at once: a request being computed lost its reply."""
    server = PolicyServer(lambda: FakePolicy(delay_s=2.0), ServeConfig(port=0))
    st = ServerThread(server)
    port = st.__enter__()
    try:
        c = RawClient(port)
        c.ws.send(packb(good_obs()))
        time.sleep(0.3)  # the request is being computed when the server is told to stop
        st._loop.call_soon_threadsafe(st._stop.set)
        time.sleep(0.3)
        with pytest.raises(urllib.error.HTTPError) as e:  # draining: a load balancer is told to look elsewhere
            http_get(port, "/healthz")
        assert e.value.code == 503
    finally:
        st.__exit__(None, None, None)
    reply = unpackb(c.ws.recv(timeout=10))
    assert reply["actions"].shape == (4, 2)
    with pytest.raises(ConnectionClosed) as e:
        c.ws.recv(timeout=10)
    assert e.value.rcvd.code == 1001


# ---- per-client state, age bound, backpressure, disconnects -------------------------------------
class _Clock:
    """The session's and the reuse layer's clock, moved by hand (asyncio keeps the real one): a test of
    ages does not hang on how long calls take on a loaded machine."""

    def __init__(self, monkeypatch):
        self.t = 1000.0
        for mod in ("kvreuse.serve.session", "kvreuse.reuse.policy"):
            monkeypatch.setattr(f"{mod}.time", self)

    def monotonic(self) -> float:
        return self.t

    def __getattr__(self, name):
        return getattr(time, name)


def test_server_bounds_cache_age_when_policy_does_not(monkeypatch):
    clock = _Clock(monkeypatch)
    made = []

    def new_policy():
        made.append(FakePolicy(decisions=("refresh", "reuse")))
        return made[-1]

    cfg = ServeConfig(port=0, max_cache_age_s=1.0)
    with ServerThread(PolicyServer(new_policy, cfg)) as port:
        c = RawClient(port)
        try:
            c.infer(good_obs())  # refresh: the cache is born
            clock.t += 0.9
            r = c.infer(good_obs())  # young cache: no reset
            assert r["server_timing"]["reuse"]["age_resets"] == 0 and made[0].resets == 0
            clock.t += 0.2
            r = c.infer(good_obs())  # too old: the server restarts the policy before it can reuse
            assert r["server_timing"]["reuse"]["age_resets"] == 1 and made[0].resets == 1
        finally:
            c.close()


def test_backpressure_bounded_queue_and_disconnect_mid_inference():
    """queue_size=1 with a slow policy: 4 clients all get answers, the queue never holds more
    than one job, and a client that leaves mid-inference disturbs no one."""
    server = PolicyServer(lambda: FakePolicy(delay_s=0.05), ServeConfig(port=0, queue_size=1))
    with ServerThread(server) as port:
        seen, errors = [], []

        def client(n: int):
            try:
                c = RawClient(port)
                for _ in range(n):
                    r = c.infer(good_obs())
                    seen.append(r["server_timing"]["reuse"]["client"])
                c.close()
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        leaver = RawClient(port)
        leaver.ws.send(packb(good_obs()))  # then gone before its reply
        leaver.ws.close()
        threads = [threading.Thread(target=client, args=(5,)) for _ in range(4)]
        for t in threads:
            t.start()
        peak = 0
        while any(t.is_alive() for t in threads):
            peak = max(peak, server._queue.qsize())
            time.sleep(0.005)
        for t in threads:
            t.join(30)
        assert not errors and len(seen) == 20 and len(set(seen)) == 4
        assert peak <= 1
        deadline = time.monotonic() + 5
        while server.clients and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = server.stats()
        assert stats["clients_connected"] == 0 and stats["clients_served"] == 5
        # The leaver's request was either skipped in the queue or its reply had nowhere to go.
        assert stats["totals"]["abandoned"] == 1 and stats["totals"]["requests"] in (20, 21)


# ---- reuse state per client (real reuse policy) --------------------------------------------------
def test_reuse_is_per_client_and_bounded_by_age(monkeypatch):
    """gate=always: each client reuses its own cache and never another's (disjoint snapshot
    ids even for identical observations); a cache older than max_cache_age_s is not reused."""
    clock = _Clock(monkeypatch)
    with ServerThread(real_server(ReuseConfig(gate="always"), max_cache_age_s=1.5)) as port:
        a, b = RawClient(port), RawClient(port)
        try:
            ra = [a.infer(good_obs(5))["server_timing"]["reuse"] for _ in range(3)]
            rb = [b.infer(good_obs(5))["server_timing"]["reuse"] for _ in range(3)]
            for r in (ra, rb):
                assert [x["decision"] for x in r] == ["refresh", "reuse", "reuse"]
                assert len({tuple(x["snapshots"]) for x in r}) == 1 and r[0]["snapshots"]  # one cache, reused
            assert not set(ra[0]["snapshots"]) & set(rb[0]["snapshots"])
            clock.t += 1.6
            old = a.infer(good_obs(5))["server_timing"]["reuse"]
            assert old["decision"] == "refresh" and "max age" in old["reason"]
            assert not set(old["snapshots"]) & set(ra[0]["snapshots"])
            r = a.infer({**good_obs(5), "reset": True})["server_timing"]["reuse"]
            assert r["decision"] == "refresh" and r["resets"] == 1
        finally:
            a.close(), b.close()


# ---- load: many clients, real model -------------------------------------------------------------
def test_loopback_load_no_errors_no_cross_client_reuse():
    clients, requests = 8, 30
    with ServerThread(real_server(ReuseConfig(gate="threshold", threshold=0.98))) as port:
        summary = run_load(HOST, port, clients, requests, image_size=64, timeout_s=90)
    print("\n" + format_summary(summary))
    assert check(summary, requests) == []
    assert summary["snapshots"] >= clients  # each client computed its own prefix at least once
    assert summary["reuse_rate"] > 0.5  # the drifting streams do get reused, within a client


def test_load_sends_the_observation_the_servers_robot_takes():
    """The load client sent Meta-World's keys and a 4-dim state to every server: against a LIBERO
    policy (8 dims) each request failed. It builds its observations from the metadata on connect."""
    template, info = build_policy(None, ReuseConfig(), "tiny-pi05", robot="libero")
    with ServerThread(make_server(template, info, ServeConfig(port=0))) as port:
        summary = run_load(HOST, port, clients=1, requests=2, image_size=32, timeout_s=60)
    assert check(summary, 2) == []
    obs = ObsStream.from_metadata(0, 32, info).obs(0)
    assert obs[info["state_key"]].shape == (8,) and set(info["image_keys"]) <= set(obs)


def test_obs_stream_is_deterministic():
    a, b = ObsStream(3, 32), ObsStream(3, 32)
    for i in range(3):
        x, y = a.obs(i), b.obs(i)
        assert all(np.array_equal(x[k], y[k]) for k in x if k != "prompt")


def test_kvreuse_serve_command_end_to_end():
    """`kvreuse serve` as a process: announces its port, answers /healthz and a client, whose
    observations may leave the prompt out (--default-prompt)."""
    import re
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "kvreuse.cli", "serve", "--port", "0", "--threads", "1", "--gate", "always",
         "--max-cache-age-s", "2", "--default-prompt", "reach the goal"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "listening on" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        m = re.search(r"ws://127\.0\.0\.1:(\d+)", line)
        assert m, f"no listening line; last: {line!r}"
        port = int(m.group(1))
        assert http_get(port, "/healthz")[0] == 200
        c = RawClient(port)
        assert c.meta["reuse"].startswith("always/full") and c.meta["max_cache_age_s"] == 2.0
        unprompted = {k: v for k, v in good_obs().items() if k != "prompt"}
        r = [c.infer(unprompted)["server_timing"]["reuse"]["decision"] for _ in range(2)]
        assert r == ["refresh", "reuse"]
        c.close()
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_kvreuse_serve_stops_cleanly_on_a_signal(signame, tmp_path):
    """SIGTERM (docker stop, systemd, kill) and Ctrl-C with a client connected: the client's
    connection is closed with 1001 (going away), not dropped, and the server says so in one line,
    exit status 0, no traceback."""
    import re
    import signal
    import subprocess
    import sys

    # SIGINT as at a terminal, even when the tests run in a background job (SIGINT ignored there).
    code = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); " \
           "from kvreuse.cli import main; main()"
    err = tmp_path / "stderr.txt"
    with open(err, "w") as errf:
        proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--port", "0", "--threads", "1"],
                                stdout=subprocess.PIPE, stderr=errf, text=True)
    try:
        line, deadline = "", time.monotonic() + 60
        while "listening on" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        m = re.search(r"ws://127\.0\.0\.1:(\d+)", line)
        assert m, f"no listening line; last: {line!r}"
        c = RawClient(int(m.group(1)))
        assert "actions" in c.infer(good_obs())
        proc.send_signal(getattr(signal, signame))
        with pytest.raises(ConnectionClosed) as closed:
            c.ws.recv(timeout=20)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = err.read_text()
    said = [s for s in text.splitlines() if not re.match(r"\d{4}-\d\d-\d\d ", s)]  # all but log records
    assert said == [f"kvreuse serve: stopped ({'Ctrl-C' if signame == 'SIGINT' else signame}); "
                    "1 client connection closed"], text
    assert "Traceback" not in text


def test_warmup_requests_stay_out_of_the_latency_window():
    """A request that captured CUDA graphs (seconds under --fast) is counted apart, so /stats'
    latency mean and p99 describe the steady state."""
    from kvreuse.serve.session import ClientSession, ClientStats

    s = ClientSession(None, "test", max_cache_age_s=5.0, policy_bounds_age=True)
    s.record(StepRecord(warmup=True), 4000.0)
    s.record(StepRecord(), 10.0)
    out = s.summary()
    assert out["requests"] == 2 and out["warmups"] == 1
    assert out["latency_ms"]["window"] == 1 and out["latency_ms"]["mean"] == 10.0
    total = ClientStats()
    total.add(s.stats)
    assert total.warmups == 1 and total.requests == 2


def test_stats_totals_window_holds_every_clients_latest_requests():
    """/stats' totals took the latencies of the last client added (its 2048 pushed out all others')."""
    from kvreuse.serve.server import PolicyServer
    from kvreuse.serve.session import ClientSession

    srv = PolicyServer(lambda: None)
    fast, slow = (ClientSession(None, n, 5.0, True, srv.latency_ms) for n in ("fast", "slow"))
    srv.clients = {fast.id: fast, slow.id: slow}
    fast.record(StepRecord(warmup=True), 4000.0)  # a graph capture: counted, never in a latency window
    for _ in range(2100):
        fast.record(StepRecord(), 0.2)
        slow.record(StepRecord(), 20.0)
    srv.clients.pop(slow.id)  # as a client leaving: its counters kept apart, its latencies stay in the window
    srv.closed_totals.add(slow.stats)
    tot = srv.stats()["totals"]
    assert tot["requests"] == 4201 and tot["warmups"] == 1 and tot["latency_ms"]["window"] == 2048
    assert tot["latency_ms"]["mean"] == pytest.approx(10.1)
    assert srv.stats()["clients"][0]["latency_ms"]["mean"] == pytest.approx(0.2)
    one = PolicyServer(lambda: None)
    s1 = ClientSession(None, "one", 5.0, True, one.latency_ms)
    s1.record(StepRecord(warmup=True), 4000.0)
    s1.record(StepRecord(), 10.0)
    assert list(one.latency_ms) == [10.0]


def test_warm_up_runs_a_fork_and_leaves_the_template_untouched():
    from kvreuse.serve.command import warm_up

    policy, _ = build_policy(None, ReuseConfig(gate="always"), "tiny-pi05", fast=True)
    forks, fork = [], policy.fork
    policy.fork = lambda *a, **k: forks.append(fork(*a, **k)) or forks[-1]
    assert warm_up(policy, calls=2) > 0.0
    assert policy.runner.call_index == 0 and len(policy.stats) == 0  # the fork ran the calls
    (warm,) = forks
    assert (warm.stats.calls, warm.stats.reuses) == (2, 1)  # both calls ran: a refresh, then a reuse hit
    actions, rec = policy.infer(good_obs())
    assert rec.decision == "refresh" and np.isfinite(actions).all()  # no cache carried over


def test_serve_defaults_to_the_shipped_policy_and_builds_a_random_one_for_other_robots(monkeypatch, capsys):
    from kvreuse.assets import shipped_checkpoint
    from kvreuse.cli import main
    from kvreuse.serve import command

    seen = []

    def stop(checkpoint, *a, **k):
        seen.append(checkpoint)
        raise ValueError("stop here")

    monkeypatch.setattr(command, "build_policy", stop)
    for argv in (["--port", "0"], ["--port", "0", "--preset", "tiny-pi0"], ["--port", "0", "--robot", "libero"]):
        with pytest.raises(SystemExit):
            main(["serve", *argv])
    capsys.readouterr()
    assert seen == [str(shipped_checkpoint("tiny-pi05")), str(shipped_checkpoint("tiny-pi0")), None]
    monkeypatch.undo()
    policy, info = build_policy(None, ReuseConfig(), "tiny-pi05", robot="libero")  # LIBERO's cameras and dims
    spec = policy.transform.spec
    obs = {k: np.zeros((64, 64, 3), np.uint8) for k in spec.camera_keys}
    obs[spec.state_key], obs["prompt"] = np.zeros(spec.state_dim), "put the bowl on the plate"
    assert info["robot"] == "libero" and policy.fork().infer(obs)[0].shape == (info["action_horizon"], 7)


@pytest.mark.parametrize("prompt, words", [("", "prompt: empty"), ("  ", "prompt: empty"),
                                           ("x " * 200, "exceed max_token_len")])
def test_serve_refuses_a_default_prompt_the_transform_would_refuse(monkeypatch, capsys, prompt, words):
    """An empty or too long --default-prompt is one error line at start, not an error to every
    client that sends no prompt (naming a prompt it never sent)."""
    from kvreuse.cli import main
    from kvreuse.serve import command

    def listening(*a, **k):
        raise ValueError("the server was about to listen")

    monkeypatch.setattr(command, "make_server", listening)
    with pytest.raises(SystemExit):
        main(["serve", "--port", "0", "--threads", "1", "--default-prompt", prompt])
    err = capsys.readouterr().err
    assert f"kvreuse: error: --default-prompt {prompt[:60]!r}: " in err and words in err, err
    with pytest.raises(SystemExit):  # a good one passes the check
        main(["serve", "--port", "0", "--threads", "1", "--default-prompt", "reach the goal"])
    assert "the server was about to listen" in capsys.readouterr().err


@pytest.mark.parametrize("host, addresses, url", [
    ("127.0.0.1", ["127.0.0.1"], "ws://127.0.0.1:4321"), ("::1", ["::1"], "ws://[::1]:4321"),
    ("localhost", ["127.0.0.1", "::1"], "ws://localhost:4321 (127.0.0.1 and ::1)")])
def test_listening_line_names_a_url_a_client_can_open(monkeypatch, capsys, host, addresses, url):
    """The line names the address to copy into a client: an IPv6 host needs brackets; a name that
    stands for several addresses is followed by those that listen."""
    from kvreuse.cli import main
    from kvreuse.serve import command

    if ":" in host and not _ipv6_binds(host):
        pytest.skip("no IPv6")  # decided apart from the code under test, whose refusal must fail the test

    class Bound:  # stands in for the server: reports its port and returns
        connected_at_stop = 0

        def __init__(self):
            self.addresses = addresses

        async def run(self, ready, stop=None):
            ready(4321)

    monkeypatch.setattr(command, "make_server", lambda *a, **k: Bound())
    main(["serve", "--host", host, "--port", "0", "--threads", "1"])
    assert f"listening on {url}  (GET" in capsys.readouterr().out


def _ipv6_binds(host: str) -> bool:
    """Whether this machine lets an IPv6 socket bind `host` (a container may have no IPv6 at all)."""
    import socket

    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("flag", ["--close-frame-mb", "--max-frame-mb"])
def test_serve_refuses_an_infinite_frame_limit_before_loading(monkeypatch, capsys, flag):
    """`--close-frame-mb inf` was accepted, then a traceback (OverflowError) once the model had
    loaded; now one error line naming the flag, before the load."""
    from kvreuse.cli import main
    from kvreuse.serve import command

    def loaded(*a, **k):
        raise ValueError("the model was loaded")

    monkeypatch.setattr(command, "build_policy", loaded)
    with pytest.raises(SystemExit):
        main(["serve", "--port", "0", "--close-frame-mb", "inf", *((flag, "inf") if flag == "--max-frame-mb" else ())])
    err = capsys.readouterr().err
    assert err.startswith("kvreuse: error: ") and f"({flag}): expected a finite number of MiB, got inf" in err, err
    assert "the model was loaded" not in err and "Traceback" not in err


def test_check_listen_binds_ipv6_as_the_server_does():
    import socket

    from kvreuse.serve.command import check_listen

    if not _ipv6_binds("::"):
        pytest.skip("no IPv6")
    with socket.socket() as v4:  # another process on 0.0.0.0:P leaves [::]:P free for an IPv6-only socket
        v4.bind(("0.0.0.0", 0))
        v4.listen()
        port = v4.getsockname()[1]
        check_listen("::", port)
        with pytest.raises(ValueError, match="in use by another process"):
            check_listen("0.0.0.0", port)


def test_port_0_listens_on_one_port_for_every_address_of_the_host(monkeypatch):
    """`--host localhost --port 0` where localhost is 127.0.0.1 and ::1: asyncio bound each with its
    own ephemeral port, and a client reaching the printed port over the other family was refused.
    Every listening socket now shares the one port (localhost resolves to both here by a stub)."""
    import socket

    with socket.socket(socket.AF_INET6) as s:
        try:
            s.bind(("::1", 0))
        except OSError as e:
            pytest.skip(f"no IPv6 loopback: {e}")
    real = socket.getaddrinfo

    def dual_stack(host, *a, **k):
        if host != "localhost":
            return real(host, *a, **k)
        return real("127.0.0.1", *a, **k) + real("::1", *a, **k)

    monkeypatch.setattr(socket, "getaddrinfo", dual_stack)
    server = PolicyServer(FakePolicy, ServeConfig(host="localhost", port=0))
    with ServerThread(server) as port:
        assert sorted(server.addresses) == ["127.0.0.1", "::1"]
        for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family) as c:
                c.settimeout(10)
                c.connect((addr, port))  # refused before: the ::1 socket had another port


def test_common_free_port_retries_a_port_taken_on_another_address_then_says_so(monkeypatch):
    """The port the first address got may be taken on the next (another process on ::1 only):
    another port is tried; when none fits, one error naming the addresses."""
    import errno
    import socket

    from kvreuse.serve.server import common_free_port

    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", 0))])
    taken = [1]  # how many binds of the second address find the port taken

    class Sock(socket.socket):
        def bind(self, addr):
            if addr[0] == "127.0.0.2" and taken[0] > 0:
                taken[0] -= 1
                raise OSError(errno.EADDRINUSE, "in use")
            return super().bind(addr)

    monkeypatch.setattr(socket, "socket", Sock)
    assert common_free_port("both") > 0 and taken == [0]
    taken[0] = 10**6
    with pytest.raises(OSError, match=r"no port free on all of 127.0.0.1, 127.0.0.2 after 3 tries"):
        common_free_port("both", tries=3)


def test_the_load_client_brackets_an_ipv6_host(monkeypatch):
    """scripts/serve_load.py's client built ws://::1:8000 by hand, which no client can parse; it
    now uses the server's URL rule (ws://[::1]:8000)."""
    import websockets.sync.client as wsc

    from kvreuse.serve.load import MiniClient

    seen = []

    def fake_connect(url, **kw):
        seen.append(url)
        raise ConnectionRefusedError(url)

    monkeypatch.setattr(wsc, "connect", fake_connect)
    for host in ("::1", "127.0.0.1"):
        with pytest.raises(ConnectionRefusedError):
            MiniClient(host, 8000)
    assert seen == ["ws://[::1]:8000", "ws://127.0.0.1:8000"]
