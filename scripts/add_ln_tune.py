"""SigLIP's residual add + LayerNorm kernel (kvreuse.model.layer_norm) at the vision tower's shape
(2 cameras: 512 rows x 1152, bf16) over rows per program and warps: us per call (CUDA-graph
replays, scripts/attn_tune._time_us), and whether each gives the default's output bit for bit.

    PYTHONPATH=src:scripts python3 scripts/add_ln_tune.py [rows]
"""

import sys

import torch
from attn_tune import _time_us

from kvreuse.model import layer_norm as ln


def main() -> None:
    m = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    n = 1152
    print(torch.cuda.get_device_name(), torch.__version__, f"{m} x {n} bf16", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    x, y = (torch.randn(m, n, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
    w, b = torch.randn(n, device="cuda", generator=g), torch.randn(n, device="cuda", generator=g)
    kernel = ln._build()
    ref = ln.add_layer_norm(x, y, w, b, 1e-6)[1].clone()
    s, h = torch.empty_like(x), torch.empty_like(x)

    def run(rows, warps):
        kernel[(-(-m // rows),)](x, y, w, b, s, h, m, n, n, n, n, n, HAS_Y=True, EPS=1e-6, ROWS=rows,
                                 BLOCK=2048, num_warps=warps)
        return h

    print("| rows / program | warps | us | same as default |\n|---|---|---|---|")
    for rows in (1, 2, 4, 8):
        for warps in (1, 2, 4, 8):
            us = _time_us(lambda rows=rows, warps=warps: run(rows, warps))
            print(f"| {rows} | {warps} | {us:.2f} | {torch.equal(run(rows, warps), ref)} |", flush=True)


if __name__ == "__main__":
    main()
