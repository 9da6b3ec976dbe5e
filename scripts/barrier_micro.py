"""Is a grid barrier inside one persistent kernel cheaper than a kernel boundary under PDL?
The question behind a persistent per-step expert kernel (docs/PERFORMANCE.md, round 5): the chain
pays ~8 dependent kernels per layer-step. Times N phases (default 1440 = 8 kernels x 18 layers x 10
steps) of the same per-program work two ways, each in one CUDA graph:
  kernels    one PDL kernel launch per phase (wait for the previous kernel, then signal), grid = SMs;
  persistent one launch, grid = SMs (all resident), a grid-wide barrier (atomic counter, release /
             acquire at GPU scope) between phases.
Work per program and phase: none, or streaming WORK bf16 elements (32 KB: a Wo-sized product over
132 SMs) from a 256 MB buffer (no L2 reuse), with the result feeding the next phase, loaded in
CHUNKS of 2048 / 8192 / 16384 elements (how much a program has in flight at once).
Usage (one sm_90 GPU): PYTHONPATH=src python3 scripts/barrier_micro.py"""

import torch
import triton
import triton.language as tl
from attn_tune import _time_us

from kvreuse.model import kernels
from kvreuse.model.kernels import pdl_kwargs

kernels._build()
_pdl_enter = kernels._pdl_enter


@triton.jit
def _work(buf_ptr, phase, pid, n, P, acc, WORK: tl.constexpr, CHUNK: tl.constexpr):
    base = buf_ptr + ((phase % P) * n + pid).to(tl.int64) * WORK
    for k in range(0, WORK, CHUNK):
        acc += tl.sum(tl.load(base + k + tl.arange(0, CHUNK)).to(tl.float32))
    return acc


@triton.jit
def _phase_kernel(buf_ptr, out_ptr, phase, P, WORK: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    n = tl.num_programs(0)
    _pdl_enter(PDL)
    acc = tl.load(out_ptr + (pid + 1) % n)  # depends on the previous phase (another program's value)
    if WORK > 0:
        acc = _work(buf_ptr, phase, pid, n, P, acc, WORK, CHUNK)
    tl.store(out_ptr + pid, acc * 0.5)


@triton.jit
def _grid_barrier(ctr_ptr, target):
    tl.debug_barrier()  # this program's stores are issued
    tl.atomic_add(ctr_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(ctr_ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(ctr_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _persistent_kernel(buf_ptr, out_ptr, ctr_ptr, N, P, WORK: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    n = tl.num_programs(0)
    for phase in range(N):
        acc = tl.load(out_ptr + (phase % 2) * n + (pid + 1) % n)  # double-buffered: no write-after-read race
        if WORK > 0:
            acc = _work(buf_ptr, phase, pid, n, P, acc, WORK, CHUNK)
        tl.store(out_ptr + ((phase + 1) % 2) * n + pid, acc * 0.5)
        _grid_barrier(ctr_ptr, (phase + 1) * n)


def compare(work: int, sms: int, buf: torch.Tensor, phases: int, chunk: int) -> None:
    p = max(1, buf.numel() // (sms * max(work, 1)))
    out = torch.zeros(sms, device="cuda")
    out2 = torch.zeros(2 * sms, device="cuda")
    ctr = torch.zeros(1, device="cuda", dtype=torch.int32)

    def chained():
        for i in range(phases):
            _phase_kernel[(sms,)](buf, out, i, p, WORK=work, CHUNK=chunk, PDL=True, num_warps=4, **pdl_kwargs(True))
        return out

    def persistent():
        ctr.zero_()
        _persistent_kernel[(sms,)](buf, out2, ctr, phases, p, WORK=work, CHUNK=chunk, num_warps=4)
        return out2

    for name, fn in (("kernels", chained), ("persistent", persistent)):
        us = _time_us(fn, reps=1, trials=10)
        print(f"work {work * 2 // 1024:>3} KB/program chunk {chunk:>5}  {name:<10} {us / 1e3:8.3f} ms for {phases} phases "
              f"= {us / phases:6.2f} us per phase", flush=True)


def main(phases=1440):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(torch.cuda.get_device_name(), "SMs", sms, "triton", triton.__version__)
    buf = torch.randn(128 * 1024 * 1024, device="cuda").to(torch.bfloat16)  # 256 MB
    compare(0, sms, buf, phases, 2048)
    for chunk in (2048, 8192, 16384):
        compare(16384, sms, buf, phases, chunk)


if __name__ == "__main__":
    main()
