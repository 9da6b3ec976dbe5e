"""`kvreuse serve`: build per-client Policies sharing one model and serve them (docs/SERVE.md)."""

from __future__ import annotations

import errno
import logging
from typing import Annotated

import tyro

from ..reuse.config import ReuseConfig


def build_policy(checkpoint: str | None, reuse: ReuseConfig, preset: str = "tiny-pi05", robot: str | None = None,
                 tokenizer: str | None = None, device: str = "cpu", seed: int = 0, fast: bool = False,
                 keep_absent_cameras: bool = False):
    """-> (template Policy, metadata for clients). Clients get `template.fork()`: the same
    model and transform (no weight copy), their own cache, reuse state and noise generator.
    fast and keep_absent_cameras as in Policy.from_checkpoint, for the random model too."""
    import torch

    from ..model import Pi0Model
    from ..model import preset as get_preset
    from ..policy import Policy, random_model_config, robot_runtime
    from ..transforms.robot import robot_spec

    if checkpoint is not None:
        from ..checkpoint import print_checkpoint_notes

        policy = Policy.from_checkpoint(checkpoint, reuse=reuse, device=device, seed=seed, tokenizer=tokenizer,
                                        robot=robot, fast=fast, keep_absent_cameras=keep_absent_cameras)
        print_checkpoint_notes(checkpoint)
        source = checkpoint
    else:  # no weights: a random model of a preset (protocol and load testing only)
        spec = robot_spec(robot or "metaworld")
        torch.manual_seed(seed)
        with torch.device(device):  # over the robot's cameras and dims, as eval's and compare's
            model = Pi0Model(random_model_config(get_preset(preset), spec)).eval()
        model, tf = robot_runtime(model, spec, None, tokenizer, fast=fast, keep_absent_cameras=keep_absent_cameras)
        policy = Policy(model, tf, seed=seed, reuse=reuse)
        source = f"random {preset}"
    cfg, spec = policy.model.cfg, policy.transform.spec
    info = {
        "model": source, "variant": cfg.variant, "robot": spec.name, "image_keys": list(spec.camera_keys),
        "state_key": spec.state_key, "state_dim": spec.state_dim, "prompt_key": spec.prompt_key,
        "action_dim": spec.action_dim, "action_horizon": cfg.chunk_size, "reuse": reuse.label(),
    }
    return policy, info


def _blank_observation(policy) -> dict:
    """Black images and a zero state for `policy`'s robot, no prompt."""
    import numpy as np

    spec, size = policy.transform.spec, policy.model.cfg.vision.image_size
    raw = {k: np.zeros((size, size, 3), np.uint8) for k in spec.camera_keys}
    raw[spec.state_key] = np.zeros(spec.state_dim)
    return raw


def warm_up(policy, calls: int = 2) -> float:
    """Run `calls` inferences on a blank observation through a fork of `policy` (the template
    keeps no state from them); -> seconds. Under --fast the first call captures FastPi0's CUDA
    graphs and a reuse hit its own (seconds on a GPU), which would otherwise fall on the first
    client's first requests. A prompt of another length may still capture a graph later."""
    import time

    raw = _blank_observation(policy)
    raw[policy.transform.spec.prompt_key] = "warm up"
    t0, fork = time.perf_counter(), policy.fork()
    for _ in range(calls):
        fork.infer(raw)
    return time.perf_counter() - t0


def check_default_prompt(policy) -> None:
    """ValueError now, before listening, if the transform's default prompt would be refused (empty,
    too many tokens): else every client that sends no prompt would get that error, naming a
    prompt it never sent."""
    tf = policy.transform
    if tf.default_prompt is None:
        return
    try:
        tf(_blank_observation(policy), device=policy.model.device)
    except ValueError as e:
        raise ValueError(f"--default-prompt {tf.default_prompt[:60]!r}: {e}") from None


def make_server(policy, info: dict, config):
    """A PolicyServer giving every client its own fork of `policy`."""
    from .server import PolicyServer

    bounded = policy.reuse_config.max_age_s is not None and policy.reuse_config.max_age_s <= config.max_cache_age_s
    return PolicyServer(policy.fork, config, metadata=info, policy_bounds_age=bounded)


def run_serve(
    checkpoint: str | None = None,
    reuse: Annotated[ReuseConfig, tyro.conf.OmitArgPrefixes] = ReuseConfig(),
    preset: str = "tiny-pi05",
    robot: str | None = None,
    tokenizer: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_frame_mb: float = 16.0,
    close_frame_mb: float = 128.0,
    queue_size: int = 16,
    max_clients: int = 64,
    max_cache_age_s: float = 5.0,
    max_batch: int = 8,
    device: str = "cpu",
    seed: int = 0,
    threads: int | None = None,
    fast: bool = False,
    keep_absent_cameras: bool = False,
    default_prompt: str | None = None,
) -> None:
    """Serve a policy over openpi's websocket protocol, one reuse state per client.

    Args:
        checkpoint: a kvreuse checkpoint directory, or lerobot / openpi Pi0 / Pi0.5 safetensors (a
            directory or its model.safetensors; these name no robot, so pass --robot, and full-size
            ones --tokenizer); without it, on Meta-World, the shipped testbed policy of a tiny
            `preset`, else a random model of `preset` (testing only).
        reuse: reuse setting for every client (--gate, --mode, --threshold, ...; see docs/REUSE.md).
        preset: model preset used when no checkpoint is given.
        robot: robot transform (default: the robot a kvreuse checkpoint names, else metaworld;
            required for a lerobot / openpi checkpoint).
        tokenizer: PaliGemma tokenizer.model for full-size models.
        host: bind address (0.0.0.0 to accept other machines).
        port: TCP port (0 picks a free one).
        max_frame_mb: larger request frames get an error reply; the connection stays open.
        close_frame_mb: larger frames close the connection (code 1009).
        queue_size: requests waiting for the model before clients are made to wait.
        max_clients: further connections are refused with HTTP 503.
        max_cache_age_s: a prefix cache older than this is never reused.
        max_batch: observations one request may batch; more get an error reply.
        device: torch device of the model.
        seed: noise seed of every client's policy (and of the random model).
        threads: torch intra-op threads, >= 1 (default: torch's choice; docs/SERVE.md's figures ran 1).
        fast: run the model through FastPi0 (fused weights, static cache, CUDA graphs on a GPU).
        keep_absent_cameras: feed model cameras the robot lacks as black, masked images (lerobot /
            openpi) instead of leaving them out of the prefix.
        default_prompt: the task for observations that send no `prompt` (as openpi's
            default_prompt); without it a missing prompt is an error.
    """
    import asyncio
    import signal
    import sys

    import torch

    from ..devices import check_device
    from .server import ServeConfig, ws_url

    # Before the model is built (minutes for a full-size checkpoint): the device, the threads and
    # the address, so a port in use is one line now, not a traceback after the load.
    check_device(device)
    from ..policy import check_seed

    check_seed(seed)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads {threads}: expected an integer >= 1 (leave it out for torch's choice)")
        torch.set_num_threads(threads)
    check_listen(host, port)
    cfg = ServeConfig(host=host, port=port, max_frame_mb=max_frame_mb, close_frame_mb=close_frame_mb,
                      queue_size=queue_size, max_clients=max_clients, max_cache_age_s=max_cache_age_s,
                      max_batch=max_batch)
    reuse = with_age_bound(reuse, max_cache_age_s)
    if checkpoint is None and robot in (None, "metaworld"):  # as eval and compare: the shipped testbed policy
        from ..assets import shipped_checkpoint

        shipped = shipped_checkpoint(preset)
        checkpoint = str(shipped) if shipped else None
    policy, info = build_policy(checkpoint, reuse, preset, robot, tokenizer, device, seed, fast, keep_absent_cameras)
    policy.transform.default_prompt = default_prompt  # shared by every client's fork
    check_default_prompt(policy)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if fast:
        logging.getLogger(__name__).info("warmed up (CUDA graphs captured) in %.1f s", warm_up(policy))
    server = make_server(policy, info, cfg)

    def ready(bound: int) -> None:  # the bound port matters with --port 0
        # A name can stand for several addresses (localhost: 127.0.0.1 and ::1): say which listen.
        addrs = "" if server.addresses in ([], [host]) else f" ({' and '.join(server.addresses)})"
        print(f"kvreuse serve: {info['model']} ({info['variant']}, robot {info['robot']}), reuse {info['reuse']}, "
              f"listening on {ws_url(host, bound)}{addrs}  (GET /healthz, GET /stats)", flush=True)

    stopped_by: list[str] = []

    async def main() -> None:
        # SIGTERM / SIGHUP (docker stop, systemd, kill) stop the server as Ctrl-C does: connections
        # closed with 1001 (going away), not dropped by the process dying mid-frame.
        loop, stop = asyncio.get_running_loop(), asyncio.Event()
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:  # not over an embedder's own
                try:
                    loop.add_signal_handler(sig, lambda s=sig: (stopped_by.append(s.name), stop.set()))
                except (NotImplementedError, RuntimeError, ValueError):  # no signals here (Windows, a thread)
                    pass
        await server.run(ready=ready, stop=stop)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        stopped_by.append("Ctrl-C")
    except OSError as e:  # the address was taken between check_listen and the server's bind
        raise ValueError(f"--host {host} --port {port}: cannot listen there: {e.strerror or e}") from None
    if stopped_by:
        n = server.connected_at_stop
        print(f"kvreuse serve: stopped ({stopped_by[0]}); {n} client connection{'s' * (n != 1)} closed",
              file=sys.stderr, flush=True)


def check_listen(host: str, port: int) -> None:
    """ValueError unless a TCP server could bind (host, port) now, as the websocket server will
    (SO_REUSEADDR and IPV6_V6ONLY, as asyncio sets them): a bad port or host, or a port another
    process listens on."""
    import socket

    from .server import bind_like_asyncio

    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: expected 0 .. 65535 (0 picks a free port)")
    try:
        addrs = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r}: not an address of this machine ({e.strerror})") from None
    for family, _, proto, _, addr in addrs:
        try:
            bind_like_asyncio(family, proto, addr).close()
        except OSError as e:
            what = "in use by another process" if e.errno == errno.EADDRINUSE else e.strerror
            raise ValueError(f"--host {host} --port {port}: cannot listen there: {what}") from None


def with_age_bound(reuse: ReuseConfig, max_cache_age_s: float) -> ReuseConfig:
    """The reuse config with the server's max cache age (the tighter of the two wins)."""
    if max_cache_age_s == float("inf"):
        return reuse
    age = max_cache_age_s if reuse.max_age_s is None else min(reuse.max_age_s, max_cache_age_s)
    return reuse.replace(max_age_s=age)
