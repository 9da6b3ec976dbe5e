"""CUDA graphs over static buffers, captured once per key and replayed: FastPi0's passes and the
reuse policy's signals."""

from __future__ import annotations

import time

import torch


def clear_cublas_workspaces() -> None:
    torch._C._cuda_clearCublasWorkspaces()


class Graphs:
    """Runs a zero-argument function over static buffers: on CUDA captured once per key as a
    CUDA graph (after two warm-up runs, which also trigger any compilation) and replayed."""

    captured = 0  # graphs captured in this process, all instances: a call that raised it was a warm-up

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.graphs: dict = {}
        self.capture_s = 0.0

    def run(self, key, fn):
        if not self.enabled:
            return fn()
        g = self.graphs.get(key)
        if g is None:
            t0 = time.perf_counter()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # cuBLAS keeps one workspace per (handle, stream), and a graph bakes in the address of
            # the one it captured with. Whoever clears those workspaces frees that block while
            # the graph still writes to it: torch.compile's CUDA graphs (mode "reduce-overhead" /
            # "max-autotune", lerobot's default) do so on every recording, and the bench's rounds
            # beside lerobot then faulted ("unspecified launch failure"; scripts/graph_mix.py).
            # Cleared before capture, the workspaces are allocated anew inside this graph's own
            # pool; cleared after, nothing else shares them, so a later clear frees the block back
            # into that pool, which stays this graph's for its lifetime.
            clear_cublas_workspaces()
            with torch.cuda.graph(graph):
                out = fn()
            clear_cublas_workspaces()
            g = self.graphs[key] = (graph, out)
            Graphs.captured += 1
            torch.cuda.synchronize()
            self.capture_s += time.perf_counter() - t0
        g[0].replay()
        return g[1]
