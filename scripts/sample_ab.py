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

    PYTHONPATH=src:scripts python3 scripts/sample_ab.py [pi0|pi05] [rounds]
"""

import sys

import torch
from ab_rounds import setup, time_rounds

from kvreuse.bench import rel_err
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
    _, model, obs, noise = setup(variant)
    fast = {"round 12": _Round12(model, compile=True), "host reads first": _HostReadsFirst(model, compile=True),
            "now": FastPi0(model, compile=True)}
    with torch.no_grad():
        outs = {k: f.sample_actions(obs, noise) for k, f in fast.items()}
        print("actions vs round 12: " + ", ".join(
            f"{k} {rel_err(o, outs['round 12']):.2e}" for k, o in outs.items() if k != "round 12"), flush=True)
        time_rounds(fast, {"sample_actions": lambda k, f: f.sample_actions(obs, noise),
                           "sample_with_prefix": lambda k, f: f.sample_with_prefix(obs, noise)}, rounds)


if __name__ == "__main__":
    main()
