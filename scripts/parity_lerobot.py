"""Parity of kvreuse's Pi0 / Pi0.5 with lerobot 0.6.1's PI0Pytorch / PI05Pytorch.

For each variant: build lerobot's model (random weights, re-initialised so that no weight is
trivially 0 or 1: Gemma norms are zero-initialised, adaRMS dense layers too), save it the way
lerobot saves a policy (safetensors.save_model under `model.`, tied embedding stored once), load
the file with kvreuse's loader, feed both identical images / masks / tokens / state / noise and
compare the action chunks: fp32 (acceptance: max |diff| <= 1e-3), then bf16 (lerobot's own
mixed precision: vision and norms stay fp32; ours all bf16), reported only.

    python scripts/parity_lerobot.py                      # full size, CUDA
    python scripts/parity_lerobot.py --device cpu --depth 1   # CPU dry run, full widths, 1 layer

Exits 0 with a message when lerobot is not importable; exits 1 if fp32 parity fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
import time
from pathlib import Path


def _skip(msg: str) -> None:
    print(f"parity_lerobot: skipped: {msg}")
    raise SystemExit(0)


def _reinit(model, seed: int) -> None:
    """Random weights with sane scales; norm weights and biases random but small, so nothing is
    exactly 0 or 1 (a zero RMSNorm weight or adaRMS layer would hide a mapping error)."""
    import torch

    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = math.prod(p.shape[1:])
                if "embed_tokens" in name or "lm_head" in name:
                    fan_in = p.shape[1]
                std = 1.0 / math.sqrt(fan_in)
                p.copy_(torch.randn(p.shape, generator=g, device=p.device) * std)
            elif "vision_tower" in name and ("layer_norm" in name or "layernorm" in name):
                base = 1.0 if name.endswith("weight") else 0.0  # SigLIP LayerNorm
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g, device=p.device))
            else:  # Gemma RMSNorm (1 + w) weights and all biases
                p.copy_(0.1 * torch.randn(p.shape, generator=g, device=p.device))


def _shrink(depth: int) -> None:
    """CPU dry runs: every lerobot stack `depth` layers deep, widths untouched."""
    from lerobot.policies.pi0 import modeling_pi0
    from lerobot.policies.pi05 import modeling_pi05

    for mod in (modeling_pi0, modeling_pi05):
        get = mod.get_gemma_config
        mapping = mod.CONFIG_MAPPING

        def small(variant, get=get):
            c = get(variant)
            c.depth = depth
            return c

        class Mapping:
            def __init__(self, inner):
                self.inner = inner

            def __getitem__(self, k):
                make = self.inner[k]
                if k != "paligemma":
                    return make

                def build(*a, **kw):
                    c = make(*a, **kw)
                    c.vision_config.num_hidden_layers = depth
                    return c

                return build

        mod.get_gemma_config = small
        mod.CONFIG_MAPPING = Mapping(mapping)


def _inputs(cfg, batch: int, device, seed: int):
    """Identical inputs for both models: 3 cameras (one missing in row 1), right-padded prompts
    of different lengths, random state and noise."""
    import torch

    g = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    images = [torch.rand(batch, 3, size, size, generator=g) * 2 - 1 for _ in cfg.cameras]
    masks = [torch.ones(batch, dtype=torch.bool) for _ in cfg.cameras]
    masks[-1][1:] = False
    n = cfg.max_token_len
    tokens = torch.randint(0, cfg.vocab_size, (batch, n), generator=g)
    lengths = [min(n, 11 + 7 * i) for i in range(batch)]
    lengths[-1] = n - 3
    tmask = torch.zeros(batch, n, dtype=torch.bool)
    for i, k in enumerate(lengths):
        tmask[i, :k] = True
    tokens = tokens.masked_fill(~tmask, 0)
    state = torch.randn(batch, cfg.max_state_dim, generator=g)
    noise = torch.randn(batch, cfg.chunk_size, cfg.max_action_dim, generator=g)
    images, masks = [i.to(device) for i in images], [m.to(device) for m in masks]
    return images, masks, tokens.to(device), tmask.to(device), state.to(device), noise.to(device)


def _diff(a, b) -> dict:
    d = (a.float() - b.float()).abs()
    return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()), "max_abs_ref": float(b.float().abs().max())}


def run_variant(variant: str, args, device) -> dict:
    import torch
    from safetensors.torch import save_model

    from kvreuse.checkpoint import load_checkpoint
    from kvreuse.model import preset
    from kvreuse.observation import Observation
    from kvreuse.ref_checkpoint import load_reference

    if variant == "pi0":
        from lerobot.policies.pi0.configuration_pi0 import PI0Config as Config
        from lerobot.policies.pi0.modeling_pi0 import PI0Pytorch as Model
    else:
        from lerobot.policies.pi05.configuration_pi05 import PI05Config as Config
        from lerobot.policies.pi05.modeling_pi05 import PI05Pytorch as Model

    t = {}
    res: dict = {"variant": variant, "depth": args.depth or "full", "batch": args.batch}
    t0 = time.perf_counter()
    lcfg = Config(dtype="float32", device=str(device))
    with torch.device(device):
        ref = Model(lcfg).eval()
    _reinit(ref, args.seed)
    t["build_lerobot_s"] = time.perf_counter() - t0

    ours_cfg = preset(variant)
    if args.depth:
        import dataclasses

        ours_cfg = ours_cfg.replace(
            vision=dataclasses.replace(ours_cfg.vision, depth=args.depth),
            llm=dataclasses.replace(ours_cfg.llm, depth=args.depth),
            expert=dataclasses.replace(ours_cfg.expert, depth=args.depth),
        )
    # lerobot's defaults must be what our preset says.
    for theirs, ours in (("chunk_size", "chunk_size"), ("max_state_dim", "max_state_dim"),
                         ("max_action_dim", "max_action_dim"), ("num_inference_steps", "num_steps"),
                         ("tokenizer_max_length", "max_token_len"), ("min_period", "time_min_period"),
                         ("max_period", "time_max_period")):
        if getattr(lcfg, theirs) != getattr(ours_cfg, ours):
            raise SystemExit(f"config mismatch: lerobot {theirs}={getattr(lcfg, theirs)} vs ours {ours}={getattr(ours_cfg, ours)}")

    t0 = time.perf_counter()
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix=f"parity_{variant}_"))
    tmp.mkdir(parents=True, exist_ok=True)
    holder = torch.nn.Module()
    holder.model = ref  # lerobot saves the policy, whose core model sits under `model.`
    save_model(holder, str(tmp / "model.safetensors"))
    del holder
    t["save_s"] = time.perf_counter() - t0
    res["file_gb"] = (tmp / "model.safetensors").stat().st_size / 1e9

    t0 = time.perf_counter()
    if args.depth:
        model, _, meta = load_reference(tmp, cfg=ours_cfg, device=device)
    else:  # full size: the variant and the config come from the file alone
        model, _, meta = load_checkpoint(tmp, device=device)
        # a Pi0 prompt is tokenized as lerobot's pipeline does (the tokens here come from the script)
        if model.cfg != (ours_cfg if variant == "pi05" else ours_cfg.replace(prompt_style="lerobot")):
            raise SystemExit(f"loader inferred {model.cfg} instead of the {variant} preset")
    t["load_ours_s"] = time.perf_counter() - t0
    if not args.depth:  # `kvreuse info` on the lerobot file
        from kvreuse.info import describe

        print(describe(tmp), flush=True)
    (tmp / "model.safetensors").unlink()
    res["format"] = meta["format"]

    images, img_masks, tokens, tmask, state, noise = _inputs(ours_cfg, args.batch, device, args.seed + 1)
    obs = Observation(
        images=dict(zip(ours_cfg.cameras, images)),
        image_masks=dict(zip(ours_cfg.cameras, img_masks)),
        state=state, tokens=tokens, token_mask=tmask,
        state_token_mask=torch.zeros_like(tmask), prompt=("parity",) * args.batch,
    )

    def lerobot_actions(steps=None):
        if variant == "pi0":
            return ref.sample_actions(images, img_masks, tokens, tmask, state, noise=noise.clone(), num_steps=steps)
        return ref.sample_actions(images, img_masks, tokens, tmask, noise=noise.clone(), num_steps=steps)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        # Pieces first: they localise a mismatch if the actions differ.
        pwe = ref.paligemma_with_expert
        res["fp32_image_embed"] = _diff(model.embed_image(images[0]), pwe.embed_image(images[0]))
        res["fp32_text_embed"] = _diff(model.embed_text(tokens), pwe.embed_language_tokens(tokens))
        v_ref = noise - lerobot_actions(1)  # one Euler step of dt=-1: x = noise - v(noise, 1)
        v_ours = noise - model.sample_actions(obs, noise.clone(), steps=1)
        res["fp32_velocity_t1"] = _diff(v_ours, v_ref)
        t0 = time.perf_counter()
        a_ref = lerobot_actions()
        sync()
        t["lerobot_fp32_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        a_ours = model.sample_actions(obs, noise.clone())
        sync()
        t["ours_fp32_s"] = time.perf_counter() - t0
        res["fp32"] = _diff(a_ours, a_ref)
        res["fp32_pass"] = res["fp32"]["max_abs_diff"] <= args.tol
        same = model.sample_actions(obs, noise.clone())
        res["fp32_repeat_bitwise_equal"] = bool(torch.equal(same, a_ours))

        if not args.no_bf16:
            pwe.to_bfloat16_for_selected_params("bfloat16")  # lerobot's bf16 (vision, norms stay fp32)
            model = model.to(torch.bfloat16)
            b_ref = lerobot_actions()
            b_ours = model.sample_actions(obs, noise.clone())
            res["bf16_ours_vs_lerobot_bf16"] = _diff(b_ours, b_ref)
            res["bf16_ours_vs_lerobot_fp32"] = _diff(b_ours, a_ref)
            res["bf16_lerobot_vs_lerobot_fp32"] = _diff(b_ref, a_ref)
    res["timings_s"] = {k: round(v, 3) for k, v in t.items()}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["pi0", "pi05"], choices=["pi0", "pi05"])
    ap.add_argument("--device", default="cuda", help="cuda (acceptance) or cpu (dry run with --depth)")
    ap.add_argument("--depth", type=int, default=0, help="layers per stack (0 = full size); for dry runs")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--tmp", default=None, help="where to write the safetensors file (default: a temp dir)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    try:
        import lerobot
        from lerobot.policies.pi0.modeling_pi0 import PI0Pytorch  # noqa: F401
        from lerobot.policies.pi05.modeling_pi05 import PI05Pytorch  # noqa: F401
    except Exception as e:  # noqa: BLE001 - not installed, or its deps are missing
        _skip(f"lerobot is not importable ({type(e).__name__}: {e})")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        _skip("no CUDA device (the acceptance run is on a GPU; use --device cpu --depth 1 for a dry run)")
    device = torch.device(args.device)
    # fp32 means fp32: no TF32 in matmuls or convolutions.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    if args.depth:
        _shrink(args.depth)
    import lerobot
    import transformers

    info = {
        "lerobot": lerobot.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    print(json.dumps(info))
    results = []
    ok = True
    for v in args.variants:
        r = run_variant(v, args, device)
        gc.collect()  # both full-size models go before the next variant is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results.append(r)
        ok &= r["fp32_pass"]
        print(json.dumps(r, indent=1), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"env": info, "results": results}, indent=1))
    print()
    print(f"{'variant':8} {'fp32 max|diff|':>15} {'max|a|':>8} {'bf16 vs lerobot bf16':>21} {'bf16 vs lerobot fp32':>21} {'lerobot bf16 vs fp32':>21}")
    for r in results:

        def b(k, r=r):
            return f"{r[k]['max_abs_diff']:.3e}" if k in r else "-"

        print(f"{r['variant']:8} {r['fp32']['max_abs_diff']:15.3e} {r['fp32']['max_abs_ref']:8.3f} "
              f"{b('bf16_ours_vs_lerobot_bf16'):>21} {b('bf16_ours_vs_lerobot_fp32'):>21} {b('bf16_lerobot_vs_lerobot_fp32'):>21}")
    print(f"fp32 parity (max |diff| <= {args.tol}): {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
