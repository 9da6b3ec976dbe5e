"""Compare tools (TurboPi's debug_action_compare / debug_deterministic_compare, rebuilt):

- compare_actions: baseline and a reuse setting on the same observation stream and the same
  noise; per-call cosine and L2 of the action chunks.
- compare_deterministic: the same inputs twice through the model, and the reuse-off Policy vs
  `model.sample_actions`: every pair must be bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..outputs import md_cell
from ..policy import Policy
from .config import ReuseConfig
from .records import summarize
from .stream import ObservationStream


def chunk_similarity(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(cosine, L2) of two action chunks, flattened."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if np.array_equal(a, b):
        return 1.0, 0.0
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    cos = float(np.clip(a @ b / max(na * nb, 1e-12), -1.0, 1.0))
    return cos, float(np.linalg.norm(a - b))


class StreamNoise:
    """One noise generator per comparison: both policies get the same tensor at every call. At an
    episode's first step with a recorded seed (`kvreuse eval --streams`) it restarts from that seed,
    as the live rollout's generator did, so a replay meets the live run's noise."""

    def __init__(self, model, seed: int):
        self.model, self.g = model, torch.Generator(device=model.device).manual_seed(seed)

    def __call__(self, step, tf) -> torch.Tensor:
        if step.reset and step.seed is not None:
            self.g.manual_seed(step.seed)
        state = step.raw.get(tf.spec.state_key)  # (B, state_dim) in a batched stream; absent: infer says so
        return self.model.make_noise(len(state) if np.ndim(state) > 1 else 1, self.g)


@dataclass
class ActionComparison:
    cosine: list[float]
    l2: list[float]
    decisions: list[str]
    baseline: dict  # latency summary
    candidate: dict
    records: list = field(default_factory=list)  # the candidate's StepRecords, call by call

    def work(self, cfg) -> tuple[float, float]:
        """(vision-tower camera passes per call, prefix token-layers computed as a share of a
        refresh every call), from the records' plan costs: what a setting actually recomputes."""
        if not self.records:
            return 0.0, 0.0
        vis = float(np.mean([r.cost.get("vision_cameras", 0) for r in self.records]))
        tl = float(np.mean([r.cost.get("lm_token_layers", 0) for r in self.records]))
        return vis, tl / (cfg.prefix_len * cfg.llm.depth)

    def summary(self) -> dict:
        c, l2 = np.asarray(self.cosine), np.asarray(self.l2)
        reused = [d == "reuse" for d in self.decisions]
        on_reuse = c[np.asarray(reused, dtype=bool)]  # empty when nothing was reused: no figure
        b, k = self.baseline["mean_ms"], self.candidate["mean_ms"]
        return {
            "calls": len(c),
            "reuse_rate": float(np.mean(reused)) if reused else 0.0,
            "cos_mean": float(c.mean()),
            "cos_min": float(c.min()),
            "cos_p5": float(np.percentile(c, 5)),
            "cos_mean_on_reuse": float(on_reuse.mean()) if on_reuse.size else None,
            "l2_mean": float(l2.mean()),
            "l2_max": float(l2.max()),
            "baseline_ms": b,
            "candidate_ms": k,
            "speedup": b / k if b > 0 and k > 0 else float("nan"),  # nan: a side had only warm-up calls
        }


def replay(policy: Policy, stream: ObservationStream, seed: int = 0) -> tuple[list[np.ndarray], list]:
    """The policy over the stream (reset at each episode start), noise from `seed`'s generator:
    -> (action chunks, records). Every replay with the same seed sees the same noise."""
    noise = StreamNoise(policy.model, seed)
    acts, recs = [], []
    for i, step in enumerate(stream):
        if step.reset or i == 0:
            policy.reset()
        try:
            a, r = policy.infer(step.raw, noise(step, policy.transform))
        except ValueError as e:  # a bad observation: say where in the stream (a folder's: which file)
            raise ValueError(f"stream {stream.where(i)}: {e}") from None
        acts.append(a)
        recs.append(r)
    return acts, recs


def compare_actions(baseline: Policy, candidate: Policy, stream: ObservationStream, seed: int = 0,
                    reference: tuple[list, list] | None = None,
                    candidate_replay: tuple[list, list] | None = None) -> ActionComparison:
    """Both policies over the stream with identical noise; `reference` / `candidate_replay`: the
    baseline's / candidate's replay (actions, records) if already made, so that several settings
    share one baseline replay (and the reference can be tabled against itself)."""
    base_acts, base_recs = reference or replay(baseline, stream, seed)
    acts, recs = candidate_replay or replay(candidate, stream, seed)
    sims = [chunk_similarity(a, b) for a, b in zip(base_acts, acts, strict=True)]
    return ActionComparison([c for c, _ in sims], [d for _, d in sims], [r.decision for r in recs],
                            summarize(base_recs), summarize(recs), recs)


def grid_table(rows: list[tuple[str, ActionComparison]], cfg) -> str:
    """Markdown: one row per (label, comparison with the baseline) for a model of config `cfg`;
    latency leaves warm-up calls out."""
    out = ["| setting | reuse rate | vision passes / call | prefix token-layers vs baseline | latency (mean) "
           "| p50 / p95 | Hz | speedup | calls | warm-ups | action cos (mean / min) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    untimed = False
    for label, res in rows:
        (s, c), (vis, tl) = (res.summary(), res.candidate), res.work(cfg)
        timed = c["warmups"] < s["calls"]  # else no call to time: n/a, not 0 ms
        untimed |= not timed
        lat = (f"{c['mean_ms']:.2f} ms | {c['p50_ms']:.2f} / {c['p95_ms']:.2f} ms | {c['hz']:.1f}" if timed
               else "n/a | n/a | n/a")
        sp = "n/a" if s["speedup"] != s["speedup"] else f"{s['speedup']:.2f}x"
        out.append(f"| {md_cell(label)} | {s['reuse_rate']:.1%} | {vis:.2f} | {tl:.1%} | {lat} | {sp} | {s['calls']} "
                   f"| {c['warmups']} | {s['cos_mean']:.5f} / {s['cos_min']:.5f} |")
    if untimed:
        out.append("\n(n/a: every call of that replay was a warm-up; replay a longer stream to time it)")
    return "\n".join(out)


@dataclass
class Check:
    name: str
    identical: bool
    max_abs_diff: float


def _diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> tuple[bool, float]:
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    diff = float((a.double() - b.double()).abs().max()) if a.shape == b.shape else float("inf")
    return same, diff


def compare_deterministic(policy: Policy, stream: ObservationStream, seed: int = 0) -> list[Check]:
    """Bit-identity checks over the stream:
    1. model.sample_actions twice on the same inputs and noise;
    2. Policy with reuse off vs model.sample_actions (+ the output transform);
    3. Policy with a never-firing gate in layer_wise mode (keeps hidden states) vs the same."""
    model, tf = policy.model, policy.transform
    off = policy.fork(ReuseConfig())
    off_lw = policy.fork(ReuseConfig(gate="never", mode="layer_wise"))
    noise = StreamNoise(model, seed)
    worst = {k: (True, 0.0) for k in ("repeat", "reuse-off", "never+layer_wise")}

    def note(name: str, res: tuple[bool, float]) -> None:
        ok, d = worst[name]
        worst[name] = (ok and res[0], max(d, res[1]))

    for i, step in enumerate(stream):
        if step.reset or i == 0:
            off.reset()
            off_lw.reset()
        n = noise(step, tf)
        try:
            obs = tf(step.raw, device=model.device)
        except ValueError as e:  # a bad observation: say where in the stream, as replay does
            raise ValueError(f"stream {stream.where(i)}: {e}") from None
        with torch.no_grad():
            ref = model.sample_actions(obs, n.clone())
            again = model.sample_actions(tf(step.raw, device=model.device), n.clone())
        note("repeat", _diff(ref, again))
        expect = tf.actions(ref, step.raw)
        expect = expect if tf.batched(step.raw) else expect[0]  # as Policy.infer shapes them
        note("reuse-off", _diff(off.infer(step.raw, n.clone())[0], expect))
        note("never+layer_wise", _diff(off_lw.infer(step.raw, n.clone())[0], expect))
    names = {
        "repeat": "sample_actions twice, same inputs",
        "reuse-off": "Policy(reuse off) vs sample_actions",
        "never+layer_wise": "Policy(gate never, layer_wise) vs sample_actions",
    }
    return [Check(names[k], ok, d) for k, (ok, d) in worst.items()]
