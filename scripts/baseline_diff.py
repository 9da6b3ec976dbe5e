"""Do two runs of the baseline agree? The episodes (task, layout, seed) that the baselines of two
results DBs both finished, and those whose outcome differs (docs/EVAL.md, "Reruns on other hosts").

Only baselines of one policy id, env, replan and protocol are compared; a DB with more than one
such group names them.

Usage: python scripts/baseline_diff.py A.db B.db [C.db ...]   (each later DB against the first)
"""

from __future__ import annotations

import argparse
import sys

from kvreuse.eval.store import open_existing, setting_group


def baseline(db: str) -> tuple[tuple, dict[tuple[str, int, int], bool]]:
    """(the baseline's group, (task, init_id, seed) -> succeeded) over its finished episodes."""
    with open_existing(db) as st:
        rows = [r for r in st.settings() if r["is_baseline"]]
        if len(rows) != 1:
            groups = [setting_group(r)[0] for r in rows]
            raise ValueError(f"{db}: {len(rows)} baselines{' (policy ids ' + ', '.join(groups) + ')' if rows else ''}; "
                             "compare DBs of one baseline")
        return setting_group(rows[0]), st.outcomes(rows[0]["id"])


def compare(a: str, b: str) -> tuple[int, list[tuple[tuple[str, int, int], bool, bool]]]:
    """(episodes both finished, [(episode, success in a, success in b)] where they differ)."""
    (ga, ea), (gb, eb) = baseline(a), baseline(b)
    if ga != gb:
        raise ValueError(f"{a} and {b}: baselines of another policy id, env, replan or protocol ({ga} vs {gb})")
    common = sorted(ea.keys() & eb.keys())
    return len(common), [(k, ea[k], eb[k]) for k in common if ea[k] != eb[k]]


def steps_apart(a: str, b: str) -> int:
    """How many episodes both baselines finished ended at another step (the same outcome or not):
    trajectories that did not replicate."""
    def steps(db: str) -> dict[tuple[str, int, int], int]:
        with open_existing(db) as st:
            (row,) = [r for r in st.settings() if r["is_baseline"]]  # baseline() checked there is one
            return {(e["task"], e["init_id"], e["seed"]): e["steps"] for e in st.episodes(row["id"])
                    if e["status"] != "error"}

    sa, sb = steps(a), steps(b)
    return sum(sa[k] != sb[k] for k in sa.keys() & sb.keys())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dbs", nargs="+")
    a = ap.parse_args(argv)
    if len(a.dbs) < 2:
        print("baseline_diff: expected two DBs or more", file=sys.stderr)
        return 2
    try:
        for other in a.dbs[1:]:
            n, diff = compare(a.dbs[0], other)
            print(f"{a.dbs[0]} vs {other}: {n} episodes in both, {len(diff)} with another outcome, "
                  f"{steps_apart(a.dbs[0], other)} ended at another step")
            for (task, init, seed), x, y in diff:
                print(f"  {task} init {init} seed {seed}: {'success' if x else 'failure'} -> "
                      f"{'success' if y else 'failure'}")
    except ValueError as e:
        print(f"baseline_diff: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
