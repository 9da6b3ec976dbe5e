"""A/B of round 13's full-inference changes, one process, one card, FastPi0s (compile on, as the
bench) over one model, timed in turn round after round (sample_actions, the bench's "full"; and
sample_with_prefix, a reuse policy's full refresh, which also reads Pi0.5's spans):
- "round 12": the observation's masks and tokens copied in before the vision pass is queued;
- "host reads first": the vision pass queued before those copies, but the prompt's rows and the
  spans still read on the host before it (commit db97aa0);
- "now": those host reads too after the vision pass is queued, where the masks' host copies
  (Observation.to) make them free of device reads.
Actions are compared with round 12's (bit-identical). The logged runs used commit 8f736cd's
version, which spelled out db97aa0's _embed in full. Commit 1d6bab8's version also timed
SigLIP's attention through kernels.mqa_attention ("triton vision", not kept).

    PYTHONPATH=src python3 scripts/sample_ab.py [pi0|pi05] [rounds]
"""

import sys

import torch

from kvreuse.bench import build_random, random_inputs, rel_err, time_fn
from kvreuse.model import preset
from kvreuse.model.fast import FastPi0


class _Round12(FastPi0):
    def _embed(self, st, obs, given, want_rows=True):
        """Round 12's order: masks and tokens, the prompt's rows, then the vision pass."""
        given = {i: given[c] for i, c in enumerate(self.cfg.cameras) if c in given} if given else {}
        run = tuple(i for i in range(len(self.cfg.cameras)) if i not in given)
        self.model._check(obs)
        self._load_obs(st, obs)
        prep = self._prepared_for(obs, consume=True)
        rows = (prep[2] if prep is not None else self._rows_of(obs)) if want_rows else None
        p, b = self.cfg.vision.num_patches, obs.batch_size
        for i, e in given.items():
            st.embeds[:, i * p : (i + 1) * p].copy_(e)
        if run:
            x = self._vision_of(st, [obs.images[self.cfg.cameras[i]] for i in run])
            for j, i in enumerate(run):
                st.embeds[:, i * p : (i + 1) * p].copy_(x[j * b : (j + 1) * b])
        return rows

    def _spans_early(self, obs, snapshot):
        return self._spans(obs, snapshot)


class _HostReadsFirst(FastPi0):
    def _embed(self, st, obs, given, want_rows=True):
        """Commit db97aa0's order: the prompt's rows read first (served to _embed as prepare()
        serves them; the spans were read before, by _spans_early), then the vision pass, then
        masks and tokens."""
        if want_rows and self._prepared_for(obs) is None:
            self._prepared = (obs, None, self._rows_of(obs), self._versions(obs))
        return super()._embed(st, obs, given, want_rows)

    def _spans_early(self, obs, snapshot):
        return self._spans(obs, snapshot)


def main() -> None:
    variant = sys.argv[1] if len(sys.argv) > 1 else "pi0"
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    print(torch.cuda.get_device_name(), torch.__version__, variant, flush=True)
    cfg = preset(variant).replace(cameras=("cam0", "cam1"))  # as kvreuse bench
    model = build_random(cfg, "cuda")
    obs, noise = random_inputs(cfg, 1, "cuda")
    fast = {"round 12": _Round12(model, compile=True), "host reads first": _HostReadsFirst(model, compile=True),
            "now": FastPi0(model, compile=True)}
    with torch.no_grad():
        outs = {k: f.sample_actions(obs, noise) for k, f in fast.items()}
        print("actions vs round 12: " + ", ".join(
            f"{k} {rel_err(o, outs['round 12']):.2e}" for k, o in outs.items() if k != "round 12"), flush=True)
        for r in range(rounds):  # in turn, so that drift between rounds meets all of them
            for name, call in (("sample_actions", lambda f: f.sample_actions(obs, noise)),
                               ("sample_with_prefix", lambda f: f.sample_with_prefix(obs, noise))):
                st = {k: time_fn(lambda f=f, call=call: call(f), 30, 3, "cuda") for k, f in fast.items()}
                print(f"round {r + 1}, {name}: " + " | ".join(f"{k} {s.median:.3f} ms (p10 {s.p10:.3f})"
                                                             for k, s in st.items()), flush=True)


if __name__ == "__main__":
    main()
