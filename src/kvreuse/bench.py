"""`kvreuse bench`: latency of the fast runtime (and the eager one, and lerobot's) at full size.

Latency does not depend on weight values, so full-size presets are built with random weights
directly on the GPU in bf16. Every figure is a CUDA-event time over `iters` calls after warm-up:
median, p10, p90 in milliseconds. `--check` compares the fast path's actions with the eager
model's (and both with a float32 copy) and exits non-zero when the fast path is off.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch


_TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # lerobot's


# ---- inputs -------------------------------------------------------------------------------------
def synthetic_obs(cfg, batch: int, device, generator: torch.Generator | None = None, prompt_tokens: int | None = None):
    """A valid Observation of random content: images in [-1, 1], a padded prompt (so the masks
    matter), for Pi0.5 a state span inside the prompt."""
    from .observation import Observation

    g = generator
    n, size = cfg.max_token_len, cfg.vision.image_size
    used = min(n, prompt_tokens if prompt_tokens is not None else max(1, (2 * n) // 3))
    images = {c: torch.rand(batch, 3, size, size, generator=g) * 2 - 1 for c in cfg.cameras}
    masks = {c: torch.ones(batch, dtype=torch.bool) for c in cfg.cameras}
    token_mask = torch.zeros(batch, n, dtype=torch.bool)
    token_mask[:, :used] = True
    state_tokens = torch.zeros(batch, n, dtype=torch.bool)
    if cfg.state_in_prompt:
        state_tokens[:, used // 2 : used] = True
    tokens = torch.randint(0, cfg.vocab_size, (batch, n), generator=g) * token_mask
    obs = Observation(images, masks, torch.randn(batch, cfg.max_state_dim, generator=g), tokens, token_mask,
                      state_tokens, ("benchmark",) * batch)
    return obs.to(device)  # as the transforms do (see Observation.host_mask)


def random_inputs(cfg, batch: int, device, seed: int = 0, prompt_tokens: int | None = None):
    """The bench's inputs: a synthetic Observation and the initial noise, from one generator."""
    g = torch.Generator().manual_seed(seed)
    obs = synthetic_obs(cfg, batch, device, g, prompt_tokens)
    return obs, torch.randn(batch, cfg.chunk_size, cfg.max_action_dim, generator=g).to(device)


def robot_inputs(cfg, batch: int, seed: int = 0):
    """What eval / serve hand a Policy: a RobotTransform over the bench model's cameras (one dict
    key each, LIBERO's 8-dim state and 7-dim actions, no norm stats) and a raw observation of
    uint8 images at the model's size, a state and a short task prompt. The byte tokenizer stands
    in for PaliGemma's SentencePiece model, which is not shipped (tens of microseconds either way
    on a short prompt; its token count sets the prompt's rows, so those rows differ from the
    synthetic observation's)."""
    from .model.tokenizer import ByteTokenizer
    from .transforms.robot import RobotSpec, RobotTransform

    spec = RobotSpec("bench", tuple((f"observation/{c}", c) for c in cfg.cameras), state_dim=8, action_dim=7)
    rng = np.random.default_rng(seed)
    lead, size = ((batch,) if batch > 1 else ()), cfg.vision.image_size
    raw = {k: rng.integers(0, 256, (*lead, size, size, 3), dtype=np.uint8) for k in spec.camera_keys}
    raw[spec.state_key] = rng.uniform(-1, 1, (*lead, spec.state_dim))
    raw[spec.prompt_key] = "pick up the black bowl"
    return RobotTransform(cfg, ByteTokenizer(), None, spec), raw


def moved_observation(obs, patch: int, rows: int = 2):
    """obs with its first camera's top `rows` rows of patches changed, and the same masks with
    their host copies: what partial reuse recomputes one camera's patches for."""
    cam = next(iter(obs.images))
    img = obs.images[cam].clone()
    img[..., : rows * patch, :] += 0.3
    return obs.with_images({cam: img})


def build_random(cfg, device, dtype=torch.bfloat16, seed: int = 0):
    """A Pi0Model with random weights made directly on `device` in `dtype` (never 3B params on
    the CPU). RMSNorm weights are drawn too (they init to zero) so (1 + w) is exercised."""
    from .model import Pi0Model

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Pi0Model(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for mod in model.modules():
            if type(mod).__name__ == "RMSNorm" and mod.weight is not None:
                mod.weight.normal_(0.0, 0.1)
    return model.requires_grad_(False)


# ---- timing -------------------------------------------------------------------------------------
@dataclass
class Stat:
    median: float
    p10: float
    p90: float
    n: int

    def row(self) -> str:
        return f"{self.median:9.3f} {self.p10:9.3f} {self.p90:9.3f}"


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    i = q * (len(s) - 1)
    lo, hi = math.floor(i), math.ceil(i)
    return s[lo] + (s[hi] - s[lo]) * (i - lo)


def time_fn(fn, iters: int, warmup: int, device) -> Stat:
    """Per-call times in ms: CUDA events around each call on GPUs, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    cuda = torch.device(device).type == "cuda"
    ts = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return Stat(_quantile(ts, 0.5), _quantile(ts, 0.1), _quantile(ts, 0.9), len(ts))


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def kv_err(cache, ref) -> float:
    """rel_err of a prefix cache's K and V against `ref`'s over the rows `ref` holds valid (padding
    rows are never attended to, and the fast path leaves those past the prompt's bucket unwritten)."""
    m = ref.mask
    return rel_err(torch.cat([cache.k[:, m], cache.v[:, m]]), torch.cat([ref.k[:, m], ref.v[:, m]]))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---- reuse-mode workloads -----------------------------------------------------------------------
def reuse_workloads(cfg, cache, obs, fraction: float, split: int, generator=None):
    """(name, model method name, kwargs) for each reuse mode's prefix update, with the
    recompute sets the reuse layer's modes use (see reuse/modes.py)."""
    p, n = cfg.vision.num_patches, len(cfg.cameras)
    t0, t = n * p, cfg.prefix_len
    dev = cache.mask.device
    valid = cache.mask.any(0)
    prompt = torch.zeros(t, dtype=torch.bool, device=dev)
    prompt[t0:] = True
    cams = tuple(cfg.cameras)
    partial = prompt.clone()
    k = max(1, round(fraction * p))
    for i in range(n):
        sel = torch.randperm(p, generator=generator)[:k] + i * p
        partial[sel.to(dev)] = True
    return [
        ("vision_only", "update_prefix", dict(recompute=prompt & valid, run_cameras=())),
        ("state_only", "update_prefix", dict(recompute=~prompt & valid, run_cameras=cams)),
        (f"layer_wise(split={split})", "update_prefix_layers", dict(split=split, run_cameras=cams)),
        (f"partial({fraction:.0%} patches)", "update_prefix", dict(recompute=partial & valid, run_cameras=cams)),
    ]


# ---- lerobot ------------------------------------------------------------------------------------
def lerobot_available() -> bool:
    try:
        import lerobot.policies.pi0.modeling_pi0  # noqa: F401

        return True
    except Exception:
        return False


def build_lerobot(variant: str, cfg, device, dtype: str = "bfloat16"):
    """lerobot 0.6.1's PI0Pytorch / PI05Pytorch with random weights, made on `device`."""
    try:  # the parity script's builder, when it exists, is the one source of truth
        sys.path.insert(0, "scripts")
        from parity_lerobot import build_lerobot_model  # type: ignore

        return build_lerobot_model(variant, cfg, device, dtype)
    except ImportError:
        pass
    finally:
        if sys.path and sys.path[0] == "scripts":
            sys.path.pop(0)
    kw = dict(dtype=dtype, chunk_size=cfg.chunk_size, n_action_steps=cfg.chunk_size,
              num_inference_steps=cfg.num_steps, tokenizer_max_length=cfg.max_token_len)
    with torch.device(device):
        if variant == "pi0":
            from lerobot.policies.pi0.configuration_pi0 import PI0Config
            from lerobot.policies.pi0.modeling_pi0 import PI0Pytorch

            return PI0Pytorch(PI0Config(**kw)).eval()
        from lerobot.policies.pi05.configuration_pi05 import PI05Config
        from lerobot.policies.pi05.modeling_pi05 import PI05Pytorch

        return PI05Pytorch(PI05Config(**kw)).eval()


def lerobot_call(model, variant: str, cfg, obs, noise):
    imgs = [obs.images[c] for c in cfg.cameras]
    masks = [obs.image_masks[c] for c in cfg.cameras]
    if variant == "pi0":
        return lambda: model.sample_actions(imgs, masks, obs.tokens, obs.token_mask, obs.state, noise=noise)
    return lambda: model.sample_actions(imgs, masks, obs.tokens, obs.token_mask, noise=noise)


# ---- the command --------------------------------------------------------------------------------
@dataclass
class Report:
    preset: str
    device: str
    config: dict
    rows: list = field(default_factory=list)  # (section, name, Stat | None, note)
    notes: list = field(default_factory=list)
    check: dict = field(default_factory=dict)
    ok: bool = True

    def add(self, section: str, name: str, stat: Stat | None, note: str = ""):
        self.rows.append((section, name, stat, note))
        s = stat.row() if stat else " " * 29
        print(f"  [{section}] {name:<34} {s}  {note}", flush=True)

    def table(self) -> str:
        w = max([44] + [len(f"{sec}: {name}") for sec, name, _, _ in self.rows])  # whole names: some differ at the end
        out = [f"== {self.preset} on {self.device} ({self.config})",
               f"{'what':<{w}} {'median':>9} {'p10':>9} {'p90':>9}  (ms)"]
        for sec, name, st, note in self.rows:
            s = st.row() if st else " " * 29
            out.append(f"{sec + ': ' + name:<{w}} {s}  {note}")
        out += [f"  {n}" for n in self.notes]
        return "\n".join(out)


def run_bench(
    preset: str = "pi0",
    batch: int = 1,
    cameras: int = 2,
    steps: int = 10,
    chunk: int = 50,
    iters: int = 50,
    warmup: int = 5,
    check: bool = False,
    tol: float = 2e-2,
    checkpoint: str | None = None,
    compile: bool = True,
    eager: bool = True,
    reuse: bool = True,
    partial_fraction: float = 0.25,
    split: int | None = None,
    lerobot: bool = True,
    lerobot_compile: bool = False,
    lerobot_rounds: int = 3,
    lerobot_compile_mode: str = "max-autotune",
    json_out: str | None = None,
    seed: int = 0,
    prefix_attn: str = "auto",
    expert_attn: str = "auto",
    variants: str = "",
    reuse_eager: bool = True,
    profile: str | None = None,
    compile_mode: str = "default",
    expert_gemm: str = "auto",
    expert_pdl: bool | None = None,
    fused_layer_norm: bool | None = None,
    vision_trt: bool = False,
    prompt_tokens: int | None = None,
    prompt_bucket: int | None = None,
    lm_down_tune: bool | None = None,
    skinny_rows: int | None = None,
) -> None:
    """Time the fast runtime at full size (random weights unless --checkpoint) and compare it
    with the eager model and, when importable, lerobot's PI0Pytorch / PI05Pytorch.

    Args:
        preset: pi0 | pi05 (full size: a CUDA GPU), or tiny-pi0 | tiny-pi05 (run on a CPU too).
        batch: observations per call.
        cameras: camera slots of the random model (a checkpoint keeps its own).
        steps: Euler steps of the denoise.
        chunk: actions per chunk of the random model (a checkpoint keeps its own).
        iters: timed calls per figure (the medians and p10 / p90 are over these).
        warmup: untimed calls before each figure's timed ones.
        check: fast actions vs eager (bf16) and a float32 copy; exit 1 if the fast path's error
            against float32 exceeds max(tol, 2 x the eager bf16 model's own error).
        tol: the least relative L2 error --check allows.
        checkpoint: time this checkpoint's weights instead of random ones (its config sets the
            shapes; lerobot is then not run beside it).
        compile: also time the fast path with torch.compile of its layer functions (CUDA).
        eager: also time the eager model (the ratios' denominator besides lerobot).
        reuse: time each reuse mode's prefix update, and the update with its denoise.
        partial_fraction: the fraction of each camera's patches the partial mode recomputes.
        split: layer_wise's split (layers below it reused; default: half the prefix LM's depth).
        lerobot: run lerobot's model side by side when lerobot is importable (GPU, random weights).
        lerobot_compile: also time lerobot torch.compile'd (its compile takes minutes).
        lerobot_rounds: after lerobot's compiled timing, this many rounds alternating our fastest
            path and lerobot compiled in the same process, with each round's ratio.
        lerobot_compile_mode: torch.compile mode for lerobot (default: what lerobot's own
            compile_model=True uses, PI0Config.compile_mode = "max-autotune", with CUDA graphs;
            its compile ran over 8 minutes on an H100; "default" is what rounds 1-8 of
            docs/PERFORMANCE.md compared against).
        json_out: also write the figures to this JSON file.
        seed: seeds the random weights and inputs.
        prefix_attn: attention kernel of the fast path's prefix LM (sdpa, fp32, math, efficient,
            cudnn, triton; auto = triton on CUDA when installed, else sdpa).
        expert_attn: the same for the action expert (auto = triton on CUDA, else fp32).
        variants: "sdpa/sdpa,sdpa/fp32,...": also time these prefix/expert attention pairs.
        reuse_eager: with eager and reuse, also time the eager model's prefix updates.
        profile: write a kernel profile of one full inference (CUDA graphs off) to this file.
        compile_mode: torch.compile mode of the fast path (max-autotune-no-cudagraphs: inductor
            autotunes its GEMMs; a longer warm-up).
        expert_gemm: torch | fused | triton | chain | auto: the expert's products through cuBLAS,
            or fused Triton kernels (fused_qkv + gated skinny GEMM; triton: also the residual
            products; chain: the whole layer as Triton kernels, norms inside the reduce kernels);
            auto picks per docs/PERFORMANCE.md.
        expert_pdl: programmatic dependent launch for the chain (default: where supported).
        fused_layer_norm: SigLIP's residual add + LayerNorm as one Triton kernel (default: on CUDA).
        vision_trt: the vision tower as TensorRT engines (needs torch_tensorrt; untested).
        prompt_tokens: valid tokens of the synthetic prompt (default two thirds of the slots).
        prompt_bucket: the fast path runs the prompt up to its last valid token rounded up to a
            multiple of this many slots (0: every slot, as before round 12; default: FastPi0's, 32
            slots for prompts of >= 128 slots (Pi0.5), else 64).
        lm_down_tune: time cuBLAS against cuBLASLt (torch's pick over padded rows, and cuBLASLt's
            other configurations) for the prefix LM's down product and keep the fastest (default:
            on CUDA).
        skinny_rows: the most suffix rows (batch x suffix) the expert runs through its Triton
            kernels, more go through cuBLAS (default FastPi0's: 128, batch 1-2; at most 256)."""
    if json_out:  # before minutes of timing
        from .outputs import check_file_out

        check_file_out(json_out, "json_out")
    rep = bench(preset, batch, cameras, steps, chunk, iters, warmup, check, tol, checkpoint, compile, eager,
                reuse, partial_fraction, split, lerobot, lerobot_compile, seed, prefix_attn, expert_attn,
                variants, reuse_eager, profile, compile_mode=compile_mode, expert_gemm=expert_gemm,
                expert_pdl=expert_pdl, fused_layer_norm=fused_layer_norm, vision_trt=vision_trt,
                lerobot_rounds=lerobot_rounds, lerobot_compile_mode=lerobot_compile_mode,
                prompt_tokens=prompt_tokens, prompt_bucket=prompt_bucket, lm_down_tune=lm_down_tune,
                skinny_rows=skinny_rows)
    print()
    print(rep.table())
    if json_out:
        with open(json_out, "w") as f:
            json.dump(
                {"preset": rep.preset, "device": rep.device, "config": rep.config, "check": rep.check,
                 "notes": rep.notes, "ok": rep.ok,
                 "rows": [dict(section=s, name=n, note=note, **(st.__dict__ if st else {})) for s, n, st, note in rep.rows]},
                f, indent=2,
            )
    if not rep.ok:
        raise SystemExit(1)


def bench(preset, batch, cameras, steps, chunk, iters, warmup, check, tol, checkpoint, compile, eager, reuse,
          partial_fraction, split, lerobot, lerobot_compile, seed, prefix_attn="auto", expert_attn="auto",
          variants="", reuse_eager=True, profile=None, compile_mode="default", expert_gemm="auto",
          expert_pdl=None, fused_layer_norm=None, vision_trt=False, lerobot_rounds=3,
          lerobot_compile_mode="max-autotune", prompt_tokens=None, prompt_bucket=None, lm_down_tune=None,
          skinny_rows=None) -> Report:
    from .model import param_count
    from .model import preset as get_preset
    from .model.fast import ATTN_KINDS, COMPILE_MODES, FastPi0, resolve_attn
    from .policy import Policy
    from .reuse.config import ReuseConfig
    from .reuse.policy import ReusePolicy

    for name, v in (("batch", batch), ("cameras", cameras), ("steps", steps), ("chunk", chunk), ("iters", iters)):
        if v < 1:
            raise ValueError(f"{name}: expected a positive integer, got {v}")
    for name, v in (("warmup", warmup), ("lerobot_rounds", lerobot_rounds)):
        if v < 0:
            raise ValueError(f"{name}: expected an integer >= 0, got {v}")
    if not tol > 0:
        raise ValueError(f"tol: expected a relative error > 0, got {tol}")
    if not 0.0 < partial_fraction <= 1.0:
        raise ValueError(f"partial_fraction: expected a fraction in (0, 1], got {partial_fraction}")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode: expected one of {COMPILE_MODES}, got {compile_mode!r}")
    if lerobot_compile_mode not in _TORCH_COMPILE_MODES:
        raise ValueError(f"lerobot_compile_mode: expected one of {_TORCH_COMPILE_MODES}, got {lerobot_compile_mode!r}")
    # Checked before the model is built: every other path of the run is minutes away.
    pairs = [tuple(v.split("/")) for v in variants.split(",") if v]
    if any(len(p) != 2 or not set(p) <= {*ATTN_KINDS, "auto"} for p in pairs):
        raise ValueError(f"variants: expected comma-separated prefix/expert pairs of {(*ATTN_KINDS, 'auto')} like "
                         f"'sdpa/fp32', got {variants!r}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t_build = time.perf_counter()  # a checkpoint's load counts (it is the build)
    if checkpoint:
        from .checkpoint import checkpoint_config, load_checkpoint

        if device == "cpu" and checkpoint_config(checkpoint)[0].tokenizer == "sentencepiece":  # (headers only)
            raise ValueError(f"checkpoint {checkpoint} is full size: run it on a CUDA GPU (a tiny checkpoint runs "
                             "on the CPU)")
        model, _, _ = load_checkpoint(checkpoint, device=device, dtype=torch.bfloat16)
        cfg = model.cfg.replace(num_steps=steps)
        model.cfg = cfg
        model.requires_grad_(False)
    else:
        cfg = get_preset(preset)
        if cfg.tokenizer == "sentencepiece" and device == "cpu":
            raise ValueError(f"preset {preset!r} is full size: run it on a CUDA GPU (tiny-* presets run on the CPU)")
        cfg = cfg.replace(cameras=tuple(f"cam{i}" for i in range(cameras)), chunk_size=chunk, num_steps=steps)
        model = None
    if prompt_tokens is not None and not 1 <= prompt_tokens <= cfg.max_token_len:
        raise ValueError(f"prompt_tokens: expected 1 .. {cfg.max_token_len} (the model's prompt slots), "
                         f"got {prompt_tokens}")
    split = cfg.llm.depth // 2 if split is None else split
    if not 1 <= split < cfg.llm.depth:
        raise ValueError(f"split: expected 1 <= split < {cfg.llm.depth}, got {split}")
    dev_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    prefix_attn = resolve_attn(prefix_attn, torch.device(device), expert=False)
    expert_attn = resolve_attn(expert_attn, torch.device(device), expert=True)
    rep = Report(preset if not checkpoint else checkpoint, dev_name,
                 dict(batch=batch, cameras=len(cfg.cameras), steps=steps, chunk=cfg.chunk_size, dtype="bf16",
                      prefix_tokens=cfg.prefix_len, attn=f"{prefix_attn}/{expert_attn}", torch=torch.__version__))
    if model is None:
        t_build = time.perf_counter()
        model = build_random(cfg, device, seed=seed)
    _sync(device)
    made = "loaded" if checkpoint else "built"
    rep.notes.append(f"model {made} in {time.perf_counter() - t_build:.1f} s ({_params(param_count(model))} params)")
    obs, noise = random_inputs(cfg, batch, device, seed + 1, prompt_tokens)
    rep.config["prompt_tokens"] = int(obs.token_mask[0].sum())
    tm = lambda fn, n=iters: time_fn(fn, n, warmup, device)  # noqa: E731
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    weights_gb = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else 0.0

    # ---- fast path (CUDA graphs, no compile) --------------------------------------------------

    def fast_section(tag: str, use_compile: bool, attn=(prefix_attn, expert_attn)) -> tuple[FastPi0, torch.Tensor]:
        t0 = time.perf_counter()
        fast = FastPi0(model, compile=use_compile, compile_mode=compile_mode if use_compile else None,
                       prefix_attn=attn[0], expert_attn=attn[1], expert_gemm=expert_gemm, expert_pdl=expert_pdl,
                       fused_layer_norm=fused_layer_norm, vision_trt=vision_trt, prompt_bucket=prompt_bucket,
                       lm_down_tune=lm_down_tune, skinny_rows=skinny_rows)
        rows = batch * model.cfg.suffix_len
        route = "" if fast.expert_gemm == "torch" else f", {rows} rows {'<=' if rows <= fast.skinny_rows else '>'} " \
            f"skinny_rows {fast.skinny_rows}"
        rep.config["expert"] = f"{fast.expert_gemm}{' +pdl' if fast.expert_pdl else ''}{route}"
        rep.config["vision_ln"] = "triton" if fast.fused_ln else "torch"
        rep.config["prefix_rope"] = "triton" if fast.rope_kernel else "torch"
        if fast.trt_vision is not None:
            rep.config["vision"] = "tensorrt (untested path)"
        out = fast.sample_actions(obs, noise)
        cache = fast.encode_prefix(obs)
        split_out = fast.denoise(cache, obs, noise)
        _sync(device)
        rep.add(tag, "warm-up (build, compile, capture)", None, f"{time.perf_counter() - t0:.1f} s")
        rep.add(tag, "full inference", tm(lambda: fast.sample_actions(obs, noise)))
        # sample_actions overlaps Euler step 0 with the prefix LM; the reuse-off baseline relies on
        # it computing exactly what encode_prefix + denoise compute.
        same = torch.equal(out, split_out)
        rep.add(tag, "sample_actions == encode_prefix + denoise", None,
                "bit-identical" if same else f"DIFFER (rel. L2 {rel_err(out, split_out):.2e})")
        if check:
            rep.ok &= same
        if fast.overlap:
            fast.overlap = False
            rep.add(tag, "full inference, no overlap", tm(lambda: fast.sample_actions(obs, noise)))
            fast.overlap = True
        # What `kvreuse eval` / `serve` run per call with reuse off: the reuse layer's refresh path
        # (one vision pass, encode_prefix, denoise, its signal references and bookkeeping).
        def policy_calls(pol, observations):
            """tm over pol.infer on `observations` in turn: the stat and the timed calls' records
            (not the warm-up's, whose first call captures graphs)."""
            recs, it = [], itertools.cycle(observations)
            st = tm(lambda: recs.append(pol.infer(next(it), noise)[1]))
            return st, recs[-iters:]

        st_pol, recs = policy_calls(ReusePolicy(fast, ReuseConfig()), (obs,))
        parts = {k: sum(r.timings[k] for r in recs) / len(recs)
                 for k in ("vision", "prefix", "denoise", "sample", "total")}
        rep.add(tag, "ReusePolicy.infer, reuse off", st_pol,
                "its records, mean ms: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
        st = fast._static(batch)
        rows = fast._rows_of(obs)
        rep.config["prefix_rows"] = rows
        rep.config["lm_down"] = {m: (repr(r) if not isinstance(r, int) else f"cublaslt over {r} rows" if r
                                     else "cuBLAS's pick") for m, r in fast.down_routes.items()}
        rep.add(tag, "vision (all cameras)", tm(lambda: fast._embed(st, obs, {})))
        rep.add(tag, f"prefix LM (text + {cfg.llm.depth} layers)", tm(lambda: fast._prefix_graph(st, (), rows)),
                f"{rows} of {cfg.prefix_len} rows")
        rep.add(tag, "encode_prefix (public, copies out)", tm(lambda: fast.encode_prefix(obs)))
        rep.add(tag, "denoise alone = reuse hit", tm(lambda: fast.denoise(cache, obs, noise)))
        # The hit as eval / serve run it: the gate's signals and the policy's bookkeeping, then the
        # denoise (the same observation each call, so every call after the first reuses).
        hit_pol = ReusePolicy(fast, ReuseConfig(gate="crossmodal"))
        hit_pol.infer(obs, noise)
        st_hit, hits = policy_calls(hit_pol, (obs,))
        rep.add(tag, "ReusePolicy.infer, reuse hit (crossmodal gate)", st_hit,
                f"{sum(r.reused for r in hits)} of {len(hits)} reused; signals "
                f"{sum(r.timings['signals'] for r in hits) / len(hits):.2f} ms (mean)")
        # Partial reuse as eval / serve run it: calls alternate between obs and a copy whose first
        # camera's top two rows of patches moved, so every call recomputes them (that camera's
        # vision pass, its moved patches and the prompt through the LM, then the denoise).
        part_pol = ReusePolicy(fast, ReuseConfig(gate="always", mode="partial"))
        part_pol.infer(obs, noise)
        st_part, part = policy_calls(part_pol, (moved_observation(obs, cfg.vision.patch_size), obs))
        rep.add(tag, "ReusePolicy.infer, partial reuse (one camera moved)", st_part,
                f"{sum(r.plan == 'tokens' for r in part)} of {len(part)} recomputed part of the prefix; "
                f"{part[-1].cost['lm_tokens']} tokens, {part[-1].cost['vision_cameras']} camera pass")
        # What eval / serve call: Policy.infer from a numpy observation (the robot transform, its
        # host-to-device copies, the reuse layer, the actions back on the host) on robot_inputs.
        tf, raw = robot_inputs(cfg, batch, seed)
        rep.add(tag, "robot transform (numpy -> Observation on the device)", tm(lambda: tf(raw, device=device)))
        for name, gate in (("reuse off", "never"), ("reuse hit (crossmodal gate)", "crossmodal")):
            pol = Policy(fast, tf, reuse=ReuseConfig(gate=gate))
            note = "numpy in, actions out; the prompt's own rows"
            rep.add(tag, f"Policy.infer, {name}", tm(lambda pol=pol: pol.infer(raw, noise)),
                    note + (" (every call after the first reuses)" if gate != "never" else ""))
        return fast, out

    fast, out_fast = fast_section("fast", False)
    ours = ("fast", fast)  # our fastest path, for the rounds beside lerobot
    if device == "cuda":
        rep.add("fast", "peak memory", None, f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (weights {weights_gb:.2f} GiB)")

    # ---- reuse modes ------------------------------------------------------------------------
    if reuse:
        gen = torch.Generator().manual_seed(seed + 2)
        base = fast.encode_prefix(obs, keep_hidden=(split,))
        for name, meth, kw in reuse_workloads(cfg, base, obs, partial_fraction, split, gen):
            call = lambda m=meth, kw=kw: getattr(fast, m)(base, obs, spans=base.spans, call_index=1, **kw)  # noqa: E731
            upd = tm(call)
            c2 = call()
            hit = tm(lambda c2=c2: (getattr(fast, meth)(base, obs, spans=base.spans, call_index=1, **kw),
                                    fast.denoise(c2, obs, noise)))
            n_tok = int(kw["recompute"].sum()) if "recompute" in kw else cfg.prefix_len
            rep.add("reuse", f"{name}: prefix update", upd, f"{n_tok} tokens, {len(kw['run_cameras'])} cams")
            rep.add("reuse", f"{name}: update + denoise", hit)
            one = tm(lambda kw=kw: fast.sample_with_update(base, obs, noise, spans=base.spans, call_index=1, **kw))
            rep.add("reuse", f"{name}: update + denoise, one call", one, "sample_with_update, as ReusePolicy runs it")
            if eager and reuse_eager:
                e_upd = tm(lambda m=meth, kw=kw: getattr(model, m)(base, obs, spans=base.spans, call_index=1, **kw),
                           max(3, iters // 10))
                rep.add("reuse", f"{name}: eager prefix update", e_upd)

    # ---- correctness ------------------------------------------------------------------------
    out_eager = None
    if eager or check:
        with torch.no_grad():
            out_eager = model.sample_actions(obs, noise)
    if check:
        other = random_inputs(cfg, batch, device, seed + 2, prompt_tokens)[0]
        with torch.no_grad():
            ref, obs32 = copy.deepcopy(model).float(), obs.to(dtype=torch.float32)
            out32, kv32 = ref.sample_actions(obs32, noise), ref.encode_prefix(obs32)
            out_other = ref.sample_actions(other.to(dtype=torch.float32), noise)
            del ref
            kv_fast, kv_eager = fast.encode_prefix(obs), model.encode_prefix(obs)
        e_fast, e_eager, e_fe = rel_err(out_fast, out32), rel_err(out_eager, out32), rel_err(out_fast, out_eager)
        limit = max(tol, 2 * e_eager)
        ok = e_fast <= limit
        # The prefix's K/V on their own: with random weights (a Pi0.5 above all) the actions hardly
        # depend on the prefix, so a prefix bug can stay inside the actions' limit.
        e_kv, e_kv_eager = kv_err(kv_fast, kv32), kv_err(kv_eager, kv32)
        kv_limit = max(tol, 2 * e_kv_eager)
        kv_ok = e_kv <= kv_limit
        e_other = rel_err(out_other, out32)
        rep.check = dict(fast_vs_fp32=e_fast, eager_bf16_vs_fp32=e_eager, fast_vs_eager_bf16=e_fe, limit=limit, ok=ok,
                         prefix_kv_fast_vs_fp32=e_kv, prefix_kv_eager_bf16_vs_fp32=e_kv_eager, prefix_kv_limit=kv_limit,
                         prefix_kv_ok=kv_ok, other_observation_vs_fp32=e_other)
        rep.ok &= ok and kv_ok
        rep.add("check", "fast vs float32 (rel. L2)", None, f"{e_fast:.2e} (limit {limit:.2e}) {'PASS' if ok else 'FAIL'}")
        rep.add("check", "eager bf16 vs float32", None, f"{e_eager:.2e}")
        rep.add("check", "fast vs eager bf16", None, f"{e_fe:.2e}")
        rep.add("check", "prefix K/V, fast vs float32 (rel. L2, valid rows)", None,
                f"{e_kv:.2e} (limit {kv_limit:.2e}; eager bf16 {e_kv_eager:.2e}) {'PASS' if kv_ok else 'FAIL'}")
        rep.add("check", "another observation's actions vs float32", None,
                f"{e_other:.2e}" + ("" if e_other > limit else " (within the actions' limit: the actions alone "
                                    "would not tell a prefix bug here; the prefix K/V check does)"))
    if device == "cuda":
        torch.cuda.empty_cache()

    # ---- attention variants -----------------------------------------------------------------
    for pa, ea in pairs:
        tag = f"attn {pa}/{ea}"
        try:
            t0 = time.perf_counter()
            fv = FastPi0(model, prefix_attn=pa, expert_attn=ea, prompt_bucket=prompt_bucket,
                         lm_down_tune=lm_down_tune)
            out_v = fv.sample_actions(obs, noise)
            cache_v = fv.encode_prefix(obs)
            stv = fv._static(batch)
            note = f"warm-up {time.perf_counter() - t0:.1f} s"
            if check:
                note += f"; vs float32 {rel_err(out_v, out32):.2e}"
            rep.add(tag, "full inference", tm(lambda: fv.sample_actions(obs, noise)), note)
            rows_v = fv._rows_of(obs)
            rep.add(tag, "prefix LM", tm(lambda: fv._prefix_graph(stv, (), rows_v)))
            rep.add(tag, "denoise alone", tm(lambda: fv.denoise(cache_v, obs, noise)))
            fv = cache_v = None  # free the variant's buffers before the next one
        except Exception as exc:
            rep.notes.append(f"{tag} failed: {type(exc).__name__}: {str(exc)[:200]}")
        if device == "cuda":
            torch.cuda.empty_cache()

    # ---- kernel profile (graphs off, so each kernel shows) --------------------------------------
    if profile and device == "cuda":
        try:
            _profile(model, obs, noise, profile, device, prefix_attn=prefix_attn, expert_attn=expert_attn,
                     expert_gemm=expert_gemm, expert_pdl=expert_pdl, compile=compile,
                     compile_mode=compile_mode if compile else None, vision_trt=vision_trt)
            rep.notes.append(f"kernel profile of one full inference (no graphs, compile={compile}) written to {profile}")
        except Exception as exc:
            rep.notes.append(f"profile failed: {type(exc).__name__}: {str(exc)[:200]}")

    # ---- eager ------------------------------------------------------------------------------
    full_fast = next(st for s, n, st, _ in rep.rows if s == "fast" and n == "full inference")
    if eager:
        with torch.no_grad():
            e_full = tm(lambda: model.sample_actions(obs, noise), max(3, iters // 5))
            e_cache = model.encode_prefix(obs)
            e_den = tm(lambda: model.denoise(e_cache, obs, noise), max(3, iters // 5))
            del e_cache
        rep.add("eager", "full inference", e_full, f"fast is {e_full.median / full_fast.median:.1f}x faster")
        rep.add("eager", "denoise alone", e_den)

    # ---- compiled fast path -----------------------------------------------------------------
    if compile and device == "cuda":
        try:
            fast_c, out_c = fast_section("fast+compile", True)
            ours = ("fast+compile", fast_c)
            e = rel_err(out_c, out_fast)
            rep.add("fast+compile", "actions vs fast (rel. L2)", None, f"{e:.2e}")
            if check:
                ok = rel_err(out_c, out32) <= rep.check["limit"]
                rep.ok &= ok
                rep.add("check", "fast+compile vs float32", None, f"{rel_err(out_c, out32):.2e} {'PASS' if ok else 'FAIL'}")
            fast_c = None
        except Exception as exc:  # report, keep the rest of the run
            rep.notes.append(f"fast+compile failed: {type(exc).__name__}: {str(exc)[:300]}")
            rep.ok &= not check  # a section --check was to check did not run: not a pass
        torch.cuda.empty_cache()

    # ---- lerobot ----------------------------------------------------------------------------
    variant = cfg.variant
    if lerobot and device == "cuda" and not checkpoint:
        if not lerobot_available():
            rep.notes.append("lerobot not importable: lerobot comparison skipped")
        else:
            fast = None  # (ours keeps the fastest instance)
            torch.cuda.empty_cache()
            try:
                t0 = time.perf_counter()
                lr = build_lerobot(variant, cfg, device)
                rep.notes.append(f"lerobot {variant} built in {time.perf_counter() - t0:.1f} s")
                with torch.no_grad():
                    fn = lerobot_call(lr, variant, cfg, obs, noise)
                    le = tm(fn, max(3, iters // 5))
                rep.add("lerobot", "eager full inference", le, _speedups(rep, le.median))
                if lerobot_compile:
                    _lerobot_compiled(rep, lr, variant, cfg, obs, noise, ours, lerobot_compile_mode, lerobot_rounds,
                                      iters, tm, device)
                else:
                    rep.notes.append("lerobot torch.compile not timed (--lerobot-compile; its compile takes minutes)")
                del lr
            except Exception as exc:
                rep.notes.append(f"lerobot failed: {type(exc).__name__}: {str(exc)[:300]}")
            torch.cuda.empty_cache()
    return rep


def _lerobot_compiled(rep: Report, lr, variant, cfg, obs, noise, ours, mode: str, n_rounds: int, iters: int, tm,
                      device) -> None:
    """lerobot compiled as its own config.compile_model does (0.6.1: fp32 matmul precision "high",
    torch.compile(sample_actions, mode=compile_mode)), timed, then alternating rounds beside ours.
    The precision stays "high" until the rounds are done: dynamo guards on it, so restoring it
    earlier would recompile lerobot inside the first round."""
    # Long and silent otherwise: say what runs and what it costs (docs/PERFORMANCE.md, round 10).
    print(f"  [lerobot] compiling {variant} with torch.compile(mode={mode!r}): minutes; max-autotune (lerobot's "
          "own) did not finish in 19 min on an H100, reduce-overhead (the same CUDA graphs) took 4-5 min", flush=True)
    precision = torch.get_float32_matmul_precision()
    try:
        fn, tc = compile_lerobot(lr, variant, cfg, obs, noise, mode, device)
        with torch.no_grad():
            lc = tm(fn, max(3, iters // 5))
        rep.add("lerobot", f"compile {mode} full inference", lc, f"compile {tc:.0f} s; {_speedups(rep, lc.median)}")
        tag, fp = ours
        with torch.no_grad():
            rounds = side_by_side(lambda: fp.sample_actions(obs, noise), fn, n_rounds, iters, max(10, iters // 2), tm)
        for i, (o, t) in enumerate(rounds):
            rep.add("lerobot", f"round {i + 1}: compile {mode}", t,
                    f"{tag} {o.median:.2f} ms (p10 {o.p10:.2f}) in the same round: {t.median / o.median:.2f}x")
        if rounds:
            r = sorted(t.median / o.median for o, t in rounds)
            rep.notes.append(f"lerobot compiled ({mode}) vs {tag}, {len(r)} alternating rounds: ratio of medians "
                             f"{', '.join(f'{x:.2f}' for x in r)} (lowest {r[0]:.2f}x)")
    finally:
        torch.set_float32_matmul_precision(precision)


def compile_lerobot(lr, variant: str, cfg, obs, noise, mode: str, device):
    """lerobot compiled as its own config.compile_model does (0.6.1: fp32 matmul precision "high",
    left set for the caller to restore, and torch.compile(sample_actions, mode=mode)), then called
    twice so that the compile (and any CUDA-graph recording) is done. -> (the call, seconds taken)."""
    t0 = time.perf_counter()
    torch.set_float32_matmul_precision("high")
    lr.sample_actions = torch.compile(lr.sample_actions, mode=mode)
    fn = lerobot_call(lr, variant, cfg, obs, noise)
    with torch.no_grad():
        fn()
        fn()
    _sync(device)
    return fn, time.perf_counter() - t0


def side_by_side(ours, theirs, rounds: int, n_ours: int, n_theirs: int, timer) -> list[tuple[Stat, Stat]]:
    """Alternate timing rounds of two callables in one process (timer(fn, n) -> Stat), so that
    whatever drifts between rounds (clocks, host load) meets both; one (ours, theirs) per round."""
    return [(timer(ours, n_ours), timer(theirs, n_theirs)) for _ in range(rounds)]


def _speedups(rep: Report, other_ms: float) -> str:
    """How much faster than other_ms each fast configuration's full inference ran."""
    full = {s: st.median for s, n, st, _ in rep.rows if n == "full inference" and s in ("fast", "fast+compile")}
    return "; ".join(f"{s} is {other_ms / ms:.1f}x faster" for s, ms in full.items())


def _profile(model, obs, noise, path, device, **fast_kw):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprof

    from .model.fast import FastPi0

    fp = FastPi0(model, graphs=False, **fast_kw)
    for _ in range(2):  # the second call runs with everything compiled
        fp.sample_actions(obs, noise)
    _sync(device)
    with tprof(activities=[ProfilerActivity.CUDA]) as prof:
        fp.sample_actions(obs, noise)
        _sync(device)
    ka = prof.key_averages()
    try:
        table = ka.table(sort_by="self_device_time_total", row_limit=45, max_name_column_width=90)
    except Exception:
        table = ka.table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=90)
    with open(path, "w") as f:
        f.write(table)


def main(argv: list[str] | None = None) -> None:
    """`python -m kvreuse.bench key=value ...` for machines without tyro. A bare `key` (or
    `--key`) sets a boolean, `no_key` clears it; `key=none` unsets an optional number/boolean."""
    import inspect
    import typing

    sig = inspect.signature(run_bench)
    hints = typing.get_type_hints(run_bench)  # real types: the annotations are strings here
    kw = {}
    try:
        for a in argv if argv is not None else sys.argv[1:]:
            k, has_value, v = a.lstrip("-").partition("=")
            k = k.replace("-", "_")
            if not has_value and k.startswith("no_") and k not in sig.parameters:
                k, v = k[3:], "false"
            if k not in sig.parameters:
                raise ValueError(f"unknown option {k!r}; options: {', '.join(sig.parameters)}")
            if not has_value:  # a bare key is a boolean flag
                if bool not in _types(hints[k]):
                    raise ValueError(f"{k}: expects a value ({k}=...)")
                v = "true" if v == "" else v
            kw[k] = _parse_value(k, v, hints[k])
        run_bench(**kw)
    except ValueError as e:  # bad input: one clear line, no traceback (as the kvreuse CLI does)
        print(f"kvreuse.bench: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _types(hint) -> tuple:
    import typing

    return typing.get_args(hint) or (hint,)  # `int | None` -> (int, NoneType)


def _parse_value(key: str, v: str, hint):
    types = _types(hint)
    if type(None) in types and v.lower() == "none" and str not in types:
        return None
    if bool in types:
        b = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(v.lower())
        if b is None:
            raise ValueError(f"{key}: expected true/false/1/0/yes/no, got {v!r}")
        return b
    for t in (int, float):
        if t in types:
            try:
                return t(v)
            except ValueError:
                raise ValueError(f"{key}: expected {'an integer' if t is int else 'a number'}, got {v!r}") from None
    return v


def _params(n: int) -> str:
    """A parameter count for the build note: 2.70B, or 1.60M for the tiny presets."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


if __name__ == "__main__":
    main()
