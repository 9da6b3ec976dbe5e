"""Pool one setting's paired episodes across several results DBs: n, lost, gained, the difference
with its 95% score interval (Newcombe's, eval/stats.py) and the exact McNemar p, per DB and pooled.

For a setting rerun on other noise seeds (`kvreuse sweep --seed N`) into another DB: each DB pairs
the setting with its own baseline (same policy, env, replan and step limit), episode by episode.
The same episode (task, layout, seed) in two DBs would count twice, so it is refused; so is a DB
whose setting ran under another policy id (weights, norm stats, device, ...), env, replan or protocol.
A setting is matched by its reuse fields, not its label: a DB written before a ReuseConfig default
changed may name the same setting otherwise (e.g. with `,state_reference=cameras`); its table row
says which name it matched.

Usage: python scripts/pool_paired.py --setting 'crossmodal(raw>=0.8,state>=0.98)/full' [--task push-v3] DB [DB ...]
"""

from __future__ import annotations

import argparse
import sys

from kvreuse.eval.stats import mcnemar, paired_interval
from kvreuse.eval.store import open_existing, setting_group
from kvreuse.reuse.config import ReuseConfig


def _config(st, row) -> ReuseConfig | None:
    try:
        return st.row_config(row)
    except ValueError:  # a field a later kvreuse wrote: not the setting asked for
        return None


_TODAY = ReuseConfig().to_dict()


def _same(a: ReuseConfig | None, b: ReuseConfig | None) -> bool:
    """Two rows run one setting: the same identity against today's defaults (the fields read, as a DB
    keys them; one the gate and mode never read, such as state_reference for a whole-prefix reuse,
    may differ by DB defaults)."""
    return a is not None and b is not None and a.diff_from(_TODAY) == b.diff_from(_TODAY)


def setting_config(dbs: list[str], setting: str) -> ReuseConfig | None:
    """The reuse setting named `setting` in the first DB that has the name (None: none has it)."""
    for db in dbs:
        with open_existing(db) as st:  # a missing path is one line, never an empty DB
            for r in st.settings():
                if r["name"] == setting and not r["is_baseline"]:
                    return _config(st, r)
    return None


def paired(db: str, setting: str, task: str | None, cfg: ReuseConfig | None = None
           ) -> tuple[tuple, str, dict[tuple[str, int, int], tuple[bool, bool]]]:
    """(the setting's group: policy, env, replan, protocol; the name it has in this DB; (task, init_id,
    seed) -> (baseline succeeded, setting succeeded) over the episodes both finished). The setting is
    the row that runs `cfg` (default: the config named `setting` in this DB)."""
    with open_existing(db) as st:  # a missing path is one line, never an empty DB
        rows = st.settings()
        if cfg is None:
            cfg = next((_config(st, r) for r in rows if r["name"] == setting and not r["is_baseline"]), None)
        mine = [r for r in rows if not r["is_baseline"] and _same(_config(st, r), cfg)]
        if len(mine) != 1:
            names = sorted({r["name"] for r in rows if not r["is_baseline"]})
            also = ("; they differ in " + _differs([setting_group(r) for r in mine])) if len(mine) > 1 else ""
            if not mine and setting in names:
                also = " with its reuse fields (its row of that name runs others)"
            raise ValueError(f"{db}: {len(mine)} settings named {setting!r}{also}; it holds {names}")
        base = [r for r in rows if r["is_baseline"] and setting_group(r) == setting_group(mine[0])]
        if not base:
            raise ValueError(f"{db}: no baseline of {setting!r}'s policy, env, replan and step limit")
        b, s = st.outcomes(base[0]["id"], task), st.outcomes(mine[0]["id"], task)
        pairs = {k: (b[k], s[k]) for k in sorted(b.keys() & s.keys())}
        if not pairs:  # a misspelled task printed a table of zeros
            tasks = sorted({k[0] for k in st.outcomes(base[0]["id"], None)})
            what = f"task {task!r}" if task is not None else "any task"
            raise ValueError(f"{db}: no episode of {what} finished by both {setting!r} and its baseline; "
                             f"the baseline ran {tasks}")
    return setting_group(mine[0]), mine[0]["name"], pairs


_GROUP = ("policy id", "env", "replan", "protocol")


def _differs(groups: list[tuple]) -> str:
    """What tells setting groups apart, e.g. "policy id 'a+cuda' vs 'a+cuda+stats@1'"."""
    diff = [f"{name} {' vs '.join(repr(g[i]) for g in groups)}" for i, name in enumerate(_GROUP)
            if len({g[i] for g in groups}) > 1]
    return ", ".join(diff) or "their reuse fields"


def pool(dbs: list[str], setting: str, task: str | None = None) -> list[tuple[str, object, tuple[float, float]]]:
    """[(label, Paired, 95% interval of the difference)] per DB, then pooled."""
    seen: dict[tuple, str] = {}
    out, base_all, set_all = [], [], []
    first: tuple[str, tuple] | None = None
    cfg = setting_config(dbs, setting)
    for db in dbs:
        group, name, pairs = paired(db, setting, task, cfg)
        if first is None:
            first = (db, group)
        elif group != first[1]:  # another policy (weights, norm stats, device, ...) or protocol: not one sample
            raise ValueError(f"{first[0]} and {db} ran {setting!r} with another {_differs([first[1], group])}: pool "
                             "one policy's runs of one protocol only")
        for k in pairs:
            if k in seen:
                raise ValueError(f"{seen[k]} and {db} both hold episode {k}: pool DBs of distinct seeds only")
            seen[k] = db
        b, s = [p[0] for p in pairs.values()], [p[1] for p in pairs.values()]
        base_all += b
        set_all += s
        r = mcnemar(b, s)
        out.append((db if name == setting else f"{db} (as {name!r})", r, paired_interval(r)))
    r = mcnemar(base_all, set_all)
    out.append(("pooled", r, paired_interval(r)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setting", required=True, help="the setting's name as `kvreuse report` prints it")
    ap.add_argument("--task", default=None, help="one task (default: all tasks)")
    ap.add_argument("dbs", nargs="+")
    a = ap.parse_args(argv)
    try:
        rows = pool(a.dbs, a.setting, a.task)
    except ValueError as e:
        print(f"pool_paired: {e}", file=sys.stderr)
        return 2
    print(f"{a.setting} vs baseline, {a.task or 'all tasks'}")
    print("| DB | n | baseline | setting | lost | gained | Δ [95%] | p (McNemar) |\n|---|---|---|---|---|---|---|---|")
    for label, r, (lo, hi) in rows:
        n = max(r.n, 1)
        print(f"| {label} | {r.n} | {(r.both + r.only_base) / n:.1%} | {(r.both + r.only_setting) / n:.1%}"
              f" | {r.only_base} | {r.only_setting} | {100 * r.diff:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}] "
              f"| {r.p_value:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
