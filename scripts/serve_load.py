"""Loopback load benchmark of `kvreuse serve`: K clients x R requests (openpi's client when
installed), then the checks of kvreuse.serve.load.check and the latency figures.

    python scripts/serve_load.py                       # 8 x 200, random tiny-pi05, in-process server
    python scripts/serve_load.py --gate threshold      # with a reuse gate (flags as `kvreuse serve`)
    python scripts/serve_load.py --port 8000 --external # against a server already running
"""

from __future__ import annotations

import sys
from typing import Annotated

import tyro

from kvreuse.reuse.config import ReuseConfig


def main(
    clients: int = 8,
    requests: int = 200,
    reuse: Annotated[ReuseConfig, tyro.conf.OmitArgPrefixes] = ReuseConfig(gate="threshold"),
    checkpoint: str | None = None,
    preset: str = "tiny-pi05",
    image_size: int = 128,
    queue_size: int = 16,
    max_cache_age_s: float = 5.0,
    threads: int = 1,
    port: int = 0,
    external: bool = False,
) -> None:
    import platform

    import torch

    from kvreuse.serve.command import build_policy, make_server, with_age_bound
    from kvreuse.serve.load import check, format_summary, run_load
    from kvreuse.serve.server import ServeConfig, ServerThread

    torch.set_num_threads(threads)
    print(f"machine: {platform.node()} {platform.machine()}, {torch.get_num_threads()} torch thread(s), "
          f"torch {torch.__version__}")
    if external:
        summary = run_load("127.0.0.1", port, clients, requests, image_size)
    else:
        config = ServeConfig(port=port, queue_size=queue_size, max_cache_age_s=max_cache_age_s)
        policy, info = build_policy(checkpoint, with_age_bound(reuse, max_cache_age_s), preset)
        print(f"server: {info['model']}, reuse {info['reuse']}, queue {queue_size}")
        with ServerThread(make_server(policy, info, config)) as bound:
            summary = run_load("127.0.0.1", bound, clients, requests, image_size)
    print(format_summary(summary))
    problems = check(summary, requests)
    for p in problems:
        print("FAIL:", p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    tyro.cli(main)
