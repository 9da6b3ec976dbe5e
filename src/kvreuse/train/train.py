"""`kvreuse train`: flow-matching behaviour cloning of a tiny Pi0 / Pi0.5 preset on the demos.

Same model code as the full presets; only the preset is small. Per step:
  - sample frames uniformly over all demos; the target is the action chunk of cfg.chunk_size
    starting there. Past the episode's end the chunk is padded (last action repeated) and the
    padded steps are masked out of the loss: the env stops at success, so nothing is executed
    there;
  - images get a small random shift (replicate-padded, per sample and camera): it keeps the tiny
    vision tower from keying on exact pixel positions of a few demos;
  - inputs go through the same RobotTransform the policy uses at run time (normalization:
    mean/std for Pi0, quantiles for Pi0.5; Pi0.5 writes the discretized state into the prompt);
  - masked flow-matching loss (the model's `loss`, with a padding mask), AdamW, linear warm-up
    then cosine decay, bf16 autocast on CUDA, an EMA of the weights (what gets saved).

The schedule runs over `steps` or `max_minutes`, whichever ends first (progress = max of the
two fractions), so a wall-clock budget still finishes with a decayed learning rate.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions so `kvreuse --help` stays fast.


def random_shift(img: torch.Tensor, pad: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1], each sample shifted by up to ±pad px."""
    import torch

    x = img.permute(0, 3, 1, 2).float() / 255.0
    if pad <= 0:
        return x
    b, _, h, w = x.shape
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="replicate")
    oy = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=gen)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(3, device=x.device)[None, :, None, None]
    return x[bi, ci, rows, cols]


PRINT_EVERY_S = 60.0  # a progress line at least this often, whatever --log-every is
CHECKPOINT_FILES = ("model.safetensors", "config.json", "norm_stats.json", "train_log.jsonl")


def _keep_interrupted(tmp, out, ema_model, stats, training: dict, init: str | None = None) -> Path | None:
    """Save the interrupted (or failed) run's EMA weights as a checkpoint at OUT.interrupted: written in
    the staging directory and renamed, so it is whole or absent. An earlier one is replaced only by a
    run continued from it (--init); else this one goes to the first free OUT.interrupted-N (a restart
    without --init, stopped after a step, replaced a long run's weights)."""
    from ..checkpoint import save_checkpoint
    from .outdir import real_out, swap_in

    def free(p: Path) -> bool:
        if not p.exists():
            return True
        ours = p.is_dir() and all(q.name in CHECKPOINT_FILES for q in p.iterdir())
        return ours and init is not None and p.resolve() == Path(init).resolve()

    out = real_out(out)  # beside the directory a symlinked --out names: the staging folder is there too
    base = out.parent / f"{out.name}.interrupted"
    kept = next(p for p in (base, *(base.with_name(f"{base.name}-{i}") for i in range(1, 10**6))) if free(p))
    save_checkpoint(tmp, ema_model.float().cpu(), stats, robot="metaworld", training=training)
    swap_in(tmp, kept)
    return kept


def rate_text(steps_per_s: float) -> str:
    """Speed for the progress line: seconds per step below one step a second (a large batch on a CPU
    printed "0.0 it/s")."""
    return f"{steps_per_s:.1f} it/s" if steps_per_s >= 1 else f"{1 / steps_per_s:.1f} s/it"


def _lr_factor(progress: float, warmup: float) -> float:
    if progress < warmup:
        return progress / warmup
    p = (progress - warmup) / max(1e-8, 1 - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def run_train(
    demos: str = "data/demos",
    out: str = "runs/testbed-pi05",
    preset: str = "tiny-pi05",
    steps: int = 20000,
    max_minutes: float = 0.0,
    batch_size: int = 128,
    lr: float = 5e-4,
    weight_decay: float = 1e-4,
    warmup: float = 0.03,
    ema: float = 0.999,
    shift: int = 6,
    device: str = "auto",
    seed: int = 0,
    log_every: int = 200,
    tasks: tuple[str, ...] = (),
    init: str | None = None,
    overwrite: bool = False,
) -> None:
    """Train a tiny preset with flow matching on `kvreuse demos` output; save a checkpoint to `out`.

    The run trains in a staging directory beside `out` and moves the checkpoint (with its
    train_log.jsonl) into place at the end: an interrupted run leaves `out` as it was and saves
    the EMA weights so far to OUT.interrupted, a checkpoint to continue from with --init; so
    does a run that fails with an error (its `training.error` in config.json says which).

    Args:
        demos: directory written by `kvreuse demos`.
        out: checkpoint directory to write; one that already holds a checkpoint is refused
            unless --overwrite.
        preset: the tiny model to train: tiny-pi05 (state in the prompt) or tiny-pi0 (state token).
        steps: most optimizer steps.
        max_minutes: optional wall-clock budget (0 = none); the LR schedule ends at whichever of
            `steps` / `max_minutes` comes first.
        batch_size: samples per optimizer step.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW's decoupled weight decay.
        warmup: linear LR warm-up, as a fraction of the schedule (0 <= warmup < 1).
        ema: decay of the weight average that gets saved.
        shift: random image shift in pixels (0 = none).
        device: auto (cuda when available, else cpu), cpu, cuda or cuda:N.
        seed: seeds the weights' init, the batch order, the image shifts and the flow-matching noise.
        log_every: print and log (train_log.jsonl) the loss every this many steps (and step 1);
            a line is also printed at least once a minute.
        tasks: train on these tasks of the demo set only (default all).
        init: start from this checkpoint's weights (fine-tuning; its preset must match; its
            normalization stats are kept).
        overwrite: replace a checkpoint already in `out`."""
    import torch

    from ..checkpoint import save_checkpoint
    from ..devices import check_device
    from ..model.config import preset as get_preset
    from ..model.pi0 import Pi0Model, param_count
    from ..model.tokenizer import load_tokenizer
    from ..observation import Observation
    from ..outputs import stop_keeping
    from ..transforms.images import preprocess_image
    from ..transforms.normalize import NormStats, Stats
    from ..transforms.robot import RobotTransform, robot_spec
    from .demos import load_demos
    from .outdir import check_out, claimed, staging, swap_in

    # Every input is checked before the (long) data preparation.
    for name, v in (("steps", steps), ("batch-size", batch_size), ("log-every", log_every)):
        if v < 1:
            raise ValueError(f"--{name} must be >= 1, got {v}")
    if not max_minutes >= 0:  # also rejects nan
        raise ValueError(f"--max-minutes must be >= 0 (0 = no budget), got {max_minutes}")
    if not 0 <= warmup < 1:
        raise ValueError(f"--warmup is a fraction of the schedule: expected 0 <= warmup < 1, got {warmup}")
    if not 0 <= ema < 1:
        raise ValueError(f"--ema must be in [0, 1), got {ema}")
    if shift < 0:
        raise ValueError(f"--shift must be >= 0 (pixels), got {shift}")
    if not lr > 0 or not weight_decay >= 0:  # also rejects nan
        raise ValueError(f"--lr must be > 0 and --weight-decay >= 0, got {lr} and {weight_decay}")
    from ..model.config import PRESETS

    spec = robot_spec("metaworld")
    testbed = [n for n, c in PRESETS.items() if (c.state_dim, c.action_dim) == (spec.state_dim, spec.action_dim)]
    if preset not in testbed:
        raise ValueError(f"--preset {preset!r}: train makes testbed policies; expected one of {', '.join(testbed)}")
    dev = check_device(device, auto=True)

    def checked_out() -> Path:
        return check_out(out, "checkpoint", lambda d: any((d / f).exists() for f in CHECKPOINT_FILES),
                         lambda p: p.name in CHECKPOINT_FILES, overwrite)

    checked_out()
    with claimed(out):  # a second run on this --out fails now, not by replacing this one's result at the end
        out_path = checked_out()  # again, now that it is ours: a run may have finished in between
        if init:
            from ..checkpoint import check_checkpoint, checkpoint_config

            try:
                check_checkpoint(init)
            except ValueError as e:
                raise ValueError(f"--init: {e}") from None
            if checkpoint_config(init)[0] != get_preset(preset):  # headers only; again once loaded
                raise ValueError(f"--init: checkpoint {init} is a different model than preset {preset!r}")
        shutil.rmtree(staging(out_path))  # a probe: an unwritable --out fails now, not after the data is loaded
        if dev.type == "cpu":
            torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)

        t_prep = time.perf_counter()
        print(f"preparing data: loading {demos} and tokenizing prompts ...", flush=True)
        data = load_demos(demos, tasks)
        cfg = get_preset(preset)
        if data.base.shape[1] != cfg.vision.image_size:
            print(f"note: demos are {data.base.shape[1]}px, the model resizes them to {cfg.vision.image_size}px")
        stats = NormStats(Stats.of(data.state), Stats.of(data.actions))
        if init:  # fine-tuning keeps the normalization the weights were trained with
            from ..checkpoint import load_checkpoint

            init_model, init_stats, init_meta = load_checkpoint(init)
            if init_model.cfg != cfg:
                raise ValueError(f"init: checkpoint {init} is a different model than preset {preset!r}")
            stats = init_stats or stats
        tf = RobotTransform(cfg, load_tokenizer(cfg), stats, spec)
        for p in data.prompts:  # fail before training if a prompt does not fit the token budget
            tf({"observation/image": data.base[:1], "observation/wrist_image": data.wrist[:1],
                "observation/state": data.state[:1], "prompt": p})

        # Prompts (and, for Pi0.5, the discretized state in them) are tokenized once for every
        # frame: per-batch tokenization in Python was a large share of each step.
        pre = [tf({"observation/image": data.base[:1].repeat(len(sl), 0),
                   "observation/wrist_image": data.wrist[:1].repeat(len(sl), 0), "observation/state": data.state[sl],
                   "prompt": list(np.array(data.prompts, dtype=object)[data.task_of[sl]])})
               for sl in np.array_split(np.arange(len(data)), max(1, len(data) // 4096))]
        all_state = torch.cat([o.state for o in pre]).to(dev)
        all_tokens = torch.cat([o.tokens for o in pre]).to(dev)
        all_tmask = torch.cat([o.token_mask for o in pre]).to(dev)
        all_smask = torch.cat([o.state_token_mask for o in pre]).to(dev)
        all_prompts = [p for o in pre for p in o.prompt]
        del pre
        # Images live on the training device (uint8) so batches are gathered there.
        base = torch.from_numpy(data.base).to(dev)
        wrist = torch.from_numpy(data.wrist).to(dev)
        nact = torch.from_numpy(tf.normalize_actions(data.actions)).to(dev)  # (N, max_action_dim)
        ep_end = torch.from_numpy(data.ep_end).to(dev)
        n, chunk = len(data), cfg.chunk_size
        print(f"data ready in {time.perf_counter() - t_prep:.0f}s: {n} frames", flush=True)

        model = Pi0Model(cfg).to(dev).train()
        if init:
            model.load_state_dict(init_model.state_dict())
            print(f"init from {init} ({init_meta.get('training', {}).get('steps', '?')} steps)")
        ema_model = Pi0Model(cfg).to(dev).eval()
        ema_model.load_state_dict(model.state_dict())
        for p in ema_model.parameters():
            p.requires_grad_(False)
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            (no_decay if p.ndim < 2 or "embed" in name or "norm" in name else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=lr, betas=(0.9, 0.95), fused=dev.type == "cuda",
        )
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda"
                    else torch.autocast("cpu", enabled=False))
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        print(f"train {preset} ({param_count(model) / 1e6:.2f}M params) on {dev}: {data.episodes} demos, {n} frames, "
              f"{len(data.tasks)} tasks, batch {batch_size}, up to {steps} steps"
              + (f" / {max_minutes} min" if max_minutes else ""), flush=True)

        def training(step: int, wall: float) -> dict:  # the checkpoint's record of how it was made
            return {
                "preset": preset, "demos": os.path.abspath(demos), "tasks": data.tasks, "prompts": data.prompts,
                "episodes": data.episodes, "frames": n, "steps": step, "batch_size": batch_size, "lr": lr,
                "weight_decay": weight_decay, "warmup": warmup, "ema": ema, "shift": shift, "seed": seed,
                "final_loss": float(np.mean(losses[-log_every:])), "wall_s": round(wall, 1), "device": str(dev),
                "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                "init": init_abs, "init_training": init_meta.get("training") if init else None,
                "demo_noise": data.meta.get("noise"), "image_size": data.meta.get("image_size"),
            }

        init_abs = os.path.abspath(init) if init else None  # the record outlives the working directory
        tmp = staging(out_path)
        losses: list[float] = []
        step, t0 = 0, time.perf_counter()
        ema_params, ema_good, good_step = list(ema_model.parameters()), None, 0  # the EMA at the last finite loss
        try:
            log = open(tmp / "train_log.jsonl", "w")
            if init:  # its history first: continuing from OUT.interrupted replaces that directory
                prev = Path(init) / "train_log.jsonl"
                log.write(prev.read_text(errors="replace") if prev.is_file() else "")
                log.write(json.dumps({"continued_from": init_abs,
                                      "init_steps": (init_meta.get("training") or {}).get("steps")}) + "\n")
            ar = torch.arange(chunk, device=dev)
            size = cfg.vision.image_size
            cams = {c: (base if k == "observation/image" else wrist) for k, c in spec.cameras}
            ones = torch.ones(batch_size, dtype=torch.bool, device=dev)
            t0 = time.perf_counter()
            progress, printed = 0.0, 0.0
            while progress < 1.0:
                ii = rng.integers(0, n, batch_size)  # kept on the host for the prompts: no device sync
                idx = torch.from_numpy(ii).to(dev)
                rows = idx[:, None] + ar[None]  # (B, chunk)
                end = ep_end[idx][:, None]
                valid = rows < end
                rows = torch.minimum(rows, end - 1)  # pad with the episode's last action
                obs = Observation(
                    images={cam: preprocess_image(random_shift(src[idx], shift), size) for cam, src in cams.items()},
                    image_masks={cam: ones for cam in cams},
                    state=all_state[idx], tokens=all_tokens[idx], token_mask=all_tmask[idx],
                    state_token_mask=all_smask[idx],
                    prompt=tuple(all_prompts[i] for i in ii),
                )
                with autocast:
                    loss = model.loss(obs, nact[rows], valid=valid.float())
                read = step < 49 or step % 10 == 9  # the loss is read (a device sync) only every 10th step
                if read:
                    value = loss.item()
                    if not math.isfinite(value):  # diverged: the rest would train (and save) NaN weights
                        # The EMA at the last finite loss is kept: these weights' loss is not, and the
                        # EMA holds them already (finite ones can still be far gone: lr 1e30).
                        bad, step = step + 1, good_step
                        if ema_good is not None:
                            torch._foreach_copy_(ema_params, ema_good)
                        raise ValueError(f"the loss is not finite at step {bad} (training diverged; try a lower --lr)")
                    # a finite loss of the weights before this step's update: the EMA as it stands is sound
                    ema_good = [p.detach().clone() for p in ema_params] if ema_good is None else ema_good
                    torch._foreach_copy_(ema_good, ema_params)
                    good_step = step
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                elapsed = time.perf_counter() - t0
                progress = max((step + 1) / steps, elapsed / (60 * max_minutes) if max_minutes else 0.0)
                for g in opt.param_groups:
                    g["lr"] = lr * _lr_factor(progress, warmup)
                opt.step()
                with torch.no_grad():
                    d = min(ema, (1 + step) / (10 + step))  # short warm-up of the EMA
                    torch._foreach_lerp_(ema_params, list(model.parameters()), 1 - d)
                step += 1
                losses.append(value if read else losses[-1])
                logged = step == 1 or step % log_every == 0 or progress >= 1.0  # step 1: early sign of life
                if logged or elapsed - printed >= PRINT_EVERY_S:  # slow steps (a CPU) still show progress
                    printed = elapsed
                    rec = {"step": step, "loss": float(np.mean(losses[-log_every:])), "lr": opt.param_groups[0]["lr"],
                           "elapsed_s": round(elapsed, 1), "steps_per_s": float(f"{step / elapsed:.3g}"),
                           "progress": round(progress, 4)}
                    if logged:
                        log.write(json.dumps(rec) + "\n")
                        log.flush()
                    eta = elapsed / max(progress, 1e-6) - elapsed
                    print(f"step {step:6d}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  {rate_text(step / elapsed)}  "
                          f"{100 * progress:5.1f}%  eta {eta / 60:.1f} min", flush=True)
            log.close()
            if not all(bool(torch.isfinite(p).all()) for p in ema_params):  # NaN after the last loss read
                raise ValueError(f"the EMA weights are not finite after step {step} (the loss, last read finite "
                                 f"at step {good_step + 1}, diverged since; try a lower --lr)")
            wall = time.perf_counter() - t0
            ema_model.float()
            save_checkpoint(tmp, ema_model.cpu(), stats, robot="metaworld", training=training(step, wall))
            swap_in(tmp, out_path)
            print(f"saved {out_path} after {step} steps in {wall / 60:.1f} min "
                  f"(final loss {np.mean(losses[-log_every:]):.4f})")
        except (KeyboardInterrupt, Exception) as e:  # Ctrl-C, SIGTERM, an error: the weights so far are kept aside
            kept, unsaved = None, ""
            why = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            if step == 0 and losses:  # diverged before any sound step: the start is all there is
                unsaved = " (no step before the loss diverged)"
            elif losses:
                try:
                    log.close()
                except OSError:  # its buffered lines hit the error again (a full disk): the weights may still fit
                    pass
                info = {**training(step, time.perf_counter() - t0), "interrupted": True, "max_steps": steps}
                if not isinstance(e, KeyboardInterrupt):
                    info["error"] = why
                try:
                    finite = all(torch.isfinite(p).all() for p in ema_model.parameters())
                    if not finite and ema_good is not None and good_step > 0:
                        # weights gone NaN between two loss reads (then Ctrl-C, an error): the last sound EMA
                        torch._foreach_copy_(ema_params, ema_good)
                        step, finite = good_step, True
                        info["steps"] = step  # the record names the steps its weights hold
                    if finite:
                        kept = _keep_interrupted(tmp, out_path, ema_model, stats, info, init)
                    else:
                        unsaved = " (its EMA weights are not finite)"
                except Exception as e2:  # noqa: BLE001 - the disk or the device that failed the run
                    unsaved = f" (saving them failed: {type(e2).__name__}: {e2})"
            msg = f"{out_path} is as it was; " + (
                f"the EMA weights after {step} of up to {steps} steps are in {kept}: continue from them with "
                f"--init {kept} (a new LR schedule) and a --seed other than {seed} (the same one would draw this "
                "run's batches again)" if kept else f"nothing of this run was kept{unsaved}")
            stop_keeping(e, "train", msg)
        finally:
            if tmp.exists():  # interrupted or failed: drop the partial run, `out` is untouched
                shutil.rmtree(tmp)


# `python -m kvreuse.train.train` (scripts/testbed_device.sh) is `kvreuse train`: one-line errors,
# and Ctrl-C / SIGTERM save OUT.interrupted (as docs/TESTBED.md says); through tyro.cli alone
# errors were tracebacks and SIGTERM ended the run at once.
if __name__ == "__main__":
    import sys

    from ..cli import main

    main(["train", *sys.argv[1:]])
