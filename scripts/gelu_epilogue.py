"""SigLIP's fc1 + GELU (512 x 1152 @ 1152 x 4304, bf16) as cuBLAS + a separate GELU kernel vs
cuBLASLt's bias + GELU epilogue (torch._addmm_activation), and which GELU the epilogue computes
(max difference against the tanh and the erf form; in bf16 that cannot tell them apart, the
float32 check in scripts/vision_ab.py can). docs/PERFORMANCE.md: not adopted in round 5,
adopted on CUDA in round 11.
Usage (one CUDA GPU): PYTHONPATH=src python3 scripts/gelu_epilogue.py"""

import torch
import torch.nn.functional as F
from attn_tune import _time_us  # same CUDA-graph timing (us per call)

torch.manual_seed(0)
x = torch.randn(512, 1152, device="cuda", dtype=torch.bfloat16)
w = torch.randn(4304, 1152, device="cuda", dtype=torch.bfloat16) * 0.03
b = torch.randn(4304, device="cuda", dtype=torch.bfloat16)
y = torch._addmm_activation(b, x, w.t(), use_gelu=True).float()
lin = x.float() @ w.float().t() + b.float()
print("vs tanh", (y - F.gelu(lin, approximate="tanh")).abs().max().item(), "vs erf", (y - F.gelu(lin)).abs().max().item())
print("unfused us", _time_us(lambda: F.gelu(F.linear(x, w, b), approximate="tanh"), reps=27, trials=20))
print("epilogue us", _time_us(lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True), reps=27, trials=20))
print("linear only us", _time_us(lambda: F.linear(x, w, b), reps=27, trials=20))
