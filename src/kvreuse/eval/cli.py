"""`kvreuse eval`, `kvreuse sweep`, `kvreuse report`, `kvreuse bench-eval`.

With no arguments they run the shipped testbed policy on Meta-World and keep results in
runs/kvreuse.db (SQLite; rerunning skips finished episodes). Heavy imports stay in the functions.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal

DEFAULT_DB = "runs/kvreuse.db"
# TurboPi's threshold sweep, whole-prefix reuse, on the raw-image cosine gate.
DEFAULT_GRID = ("gate=threshold threshold=0.98,0.985,0.99,0.995 mode=full",)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _plan(db, env, tasks, episodes, init_start, seed, replan, max_steps, workers, videos, grid, baseline, progress,
          device: str = "cpu", streams: int = 0, retry_errors: bool = False, libero_scenes: str = "openpi"):
    from .sweep import SweepPlan

    if workers is None:  # one per core; one for a GPU policy (each worker would hold its own model there)
        workers = 1 if device.startswith("cuda") else _cores()
    return SweepPlan(
        db=db, env=env, tasks=tuple(tasks), episodes=episodes, init_start=init_start, seed=seed, replan=replan,
        max_steps=max_steps, grid=grid, baseline=baseline, workers=workers,
        videos=videos, video_dir=str(Path(db).parent / "videos"), progress=progress,
        streams=streams, stream_dir=str(Path(db).parent / "streams"), retry_errors=retry_errors,
        env_kw={"scenes": libero_scenes} if env.startswith("libero:") else {},
    )


def _print_summary(summary, db: str) -> bool:
    """Print the run's line and table; True when episodes ran, every one an env error, and no setting that
    ran episodes here has a finished one (a table of n = 0 must not read as a run that worked, nor may a
    baseline stored before make it one)."""
    from .report import ALL, compute_rows, markdown

    print(f"{summary.ran} episodes run, {summary.skipped} already in {db}, {summary.errors} env errors, "
          f"{summary.wall_s:.1f} s", file=sys.stderr)
    if summary.stored_elsewhere:
        print(f"{summary.stored_elsewhere} of those were stored by another process first (a concurrent run on "
              f"this DB); its results were kept", file=sys.stderr)
    # The settings just run and their baselines, on the episodes just run (or found stored): every
    # row on the same episodes, not on other policies', protocols', tasks' or earlier runs' ones.
    rows = compute_rows(db, only=set(summary.episodes))
    keys = {s.key for s in summary.settings}
    groups = {r.group for r in rows if r.key in keys}
    tasks = {ALL, *summary.tasks}
    shown = [r for r in rows if r.group in groups and (r.key in keys or r.is_baseline) and r.task in tasks]
    print(markdown(shown))
    for r in shown:  # a rerun skips stored errors: without a word the setting stayed at n = 0
        if r.key in keys and r.task == ALL and not r.n and r.errors:
            print(f"note: {r.setting}: its {r.errors} episode(s) here are stored env errors, skipped when run again; "
                  "--retry-errors runs them again", file=sys.stderr)
    # (a setting that ran nothing here, as a baseline stored before, does not make the run one that worked)
    ran = [r for r in shown if r.key in summary.ran_keys]
    return bool(summary.ran) and summary.errors == summary.ran and not any(r.n for r in ran)


def _stop_if_all_errors(failed: bool, ran: int) -> None:
    if failed:
        print(f"kvreuse: error: every one of the {ran} episodes run ended in an env error and none is finished (a "
              f"simulator or renderer failure, e.g. MUJOCO_GL; stored as errors, their messages in the DB's `error` "
              f"column: --retry-errors runs them again)", file=sys.stderr)
        raise SystemExit(1)


def run_eval(
    reuse: str = "",
    checkpoint: str | None = None,
    env: str = "metaworld",
    tasks: tuple[str, ...] = (),
    episodes: int = 50,
    init_start: int = 0,
    seed: int = 0,
    replan: int = 5,
    max_steps: int | None = None,
    workers: int | None = None,
    videos: int = 0,
    streams: int = 0,
    db: str = DEFAULT_DB,
    with_baseline: bool = False,
    preset: str = "tiny-pi05",
    device: str = "cpu",
    dtype: str = "float32",
    fast: bool = False,
    keep_absent_cameras: bool = False,
    tokenizer: str | None = None,
    progress: bool = True,
    retry_errors: bool = False,
    libero_scenes: Literal["openpi", "first"] = "openpi",
) -> None:
    """Evaluate one setting closed-loop and print its table.

    Args:
        reuse: the reuse setting as 'key=value ...' ReuseConfig fields, e.g. 'gate=threshold
            threshold=0.985 mode=full'; empty = the baseline (no reuse).
        checkpoint: a kvreuse checkpoint directory, or lerobot / openpi Pi0 / Pi0.5 safetensors (a
            directory or its model.safetensors); default: the shipped testbed policy.
        env: metaworld | libero:<suite> | fake.
        tasks: task names (default: the checkpoint's tasks, else all of the env's).
        episodes: episodes per task (init states init_start .. init_start+episodes-1, wrapping round
            past a task's last one; a note where they repeat).
        seed: base seed; each episode's seed (env reset and policy noise) derives from it.
        replan: execute the first `replan` actions of each chunk, then call the policy again.
        max_steps: per-episode step limit (default: the env's).
        workers: parallel worker processes (default: one per core, one with a CUDA device; 0 = in
            this process).
        videos: record videos of the first N episodes of each task (next to the DB, videos/).
        streams: record what the policy sees in the first N episodes of each task (next to the DB,
            streams/<setting>/<task>_<init>_<seed>.safetensors), for replay with `kvreuse compare
            actions --stream` (e.g. through a full-size model on a GPU: docs/REUSE.md).
        db: the SQLite results file (kept; finished episodes are skipped on a rerun).
        retry_errors: run again the episodes stored as errors (a worker killed from outside, a
            simulator crash); their new results replace the error rows.
        with_baseline: also run the baseline on the same episodes (for the paired comparison).
        preset: tiny-pi05 | tiny-pi0, for runs without --checkpoint: on an env of the Meta-World
            robot (metaworld, fake) the shipped testbed policy of that preset (testbed-pi05 /
            testbed-pi0) runs; on LIBERO, which has none, a random-weight model of that preset
            (with a warning; success ~0, for testing the harness).
        init_start: first init-state id (Meta-World: 0..49 are the held-out layouts).
        device: torch device of the policy (cpu, cuda).
        dtype: the policy's weights, float32 | bfloat16 (what the GPU figures of
            docs/PERFORMANCE.md run); bfloat16 episodes are kept apart in the DB.
        fast: run the policy through FastPi0 (CUDA graphs and Triton kernels on a GPU; on a CPU
            plain calls). Its episodes are kept apart from the eager model's (their actions round
            differently).
        keep_absent_cameras: feed model cameras the env lacks as black, masked images (lerobot /
            openpi) instead of leaving them out of the prefix (kept apart in the DB too).
        tokenizer: the PaliGemma SentencePiece tokenizer.model, for full-size checkpoints.
        progress: show progress on stderr (a bar on a terminal, else a line per ~10% of the episodes).
        libero_scenes: LIBERO's fixture layouts: openpi's k-th for episode k, with a hard reset per
            episode as openpi (default), or episode 0's for every episode through a soft reset
            (faster; what kvreuse ran before, and its rows continue those).
    """
    from .sweep import PolicySource, run_sweep

    grid = one_setting(reuse, "eval")
    plan = _plan(db, env, tasks, episodes, init_start, seed, replan, max_steps, workers, videos, grid,
                 with_baseline or not grid, progress, device, streams, retry_errors, libero_scenes)
    summary = run_sweep(plan, PolicySource(checkpoint, preset, device, fast, keep_absent_cameras, dtype, tokenizer))
    _stop_if_all_errors(_print_summary(summary, db), summary.ran)


def one_setting(reuse: str, command: str) -> list[dict]:
    """--reuse 'key=value ...' -> a grid of at most one setting (a list of values is a sweep's)."""
    from .sweep import parse_grid, reuse_config

    try:
        grid = parse_grid([reuse]) if reuse.strip() else []
    except ValueError as e:  # parse_grid speaks of --grid
        raise ValueError(str(e).replace("grid:", "reuse:", 1)) from None
    if len(grid) > 1:
        raise ValueError(f"reuse: `{command}` runs one setting, {reuse!r} gives {len(grid)}; "
                         "use `kvreuse sweep --grid`")
    if grid and not reuse_config(grid[0]).enabled:  # canonical_grid would speak of --grid and "leave it out"
        gate = "" if "gate" in grid[0] else " (a setting needs a gate=, e.g. gate=threshold)"
        raise ValueError(f"reuse: {reuse!r} never reuses{gate}; the baseline is an empty --reuse"
                         + (" (or --with-baseline beside a setting)" if command == "eval" else ""))
    return grid


def run_sweep_cmd(
    grid: tuple[str, ...] = DEFAULT_GRID,
    checkpoint: str | None = None,
    env: str = "metaworld",
    tasks: tuple[str, ...] = (),
    episodes: int = 50,
    init_start: int = 0,
    seed: int = 0,
    replan: int = 5,
    max_steps: int | None = None,
    workers: int | None = None,
    videos: int = 0,
    streams: int = 0,
    db: str = DEFAULT_DB,
    preset: str = "tiny-pi05",
    device: str = "cpu",
    dtype: str = "float32",
    fast: bool = False,
    keep_absent_cameras: bool = False,
    tokenizer: str | None = None,
    report_dir: str | None = None,
    progress: bool = True,
    retry_errors: bool = False,
    libero_scenes: Literal["openpi", "first"] = "openpi",
) -> None:
    """Paired sweep: the baseline plus every reuse setting of the grid, on the same episodes.

    Args:
        grid: one or more 'key=v1,v2 key2=v3' specs over ReuseConfig fields; each spec is a
            cartesian product, specs are unioned. E.g. 'gate=threshold threshold=0.98,0.985
            mode=full,vision_only' 'gate=period period=2,4'.
        report_dir: also write report.md, results.csv and plots there.
    """
    from .sweep import PolicySource, parse_grid, run_sweep

    if report_dir:  # before the episodes, which can take hours
        from ..outputs import check_dir_out

        check_dir_out(report_dir, "--report-dir")
    plan = _plan(db, env, tasks, episodes, init_start, seed, replan, max_steps, workers, videos,
                 parse_grid(list(grid)), True, progress, device, streams, retry_errors, libero_scenes)
    summary = run_sweep(plan, PolicySource(checkpoint, preset, device, fast, keep_absent_cameras, dtype, tokenizer))
    failed = _print_summary(summary, db)
    if report_dir:
        from .report import write_report

        _, files = write_report(db, report_dir)
        print("wrote " + ", ".join(str(f) for f in files), file=sys.stderr)
    _stop_if_all_errors(failed, summary.ran)


def run_report(db: str | None = None, out: str | None = None, plots: bool = True, csv: str | None = None) -> None:
    """Markdown tables (printed), CSV and plots of a results DB.

    Args:
        db: the SQLite results file (default: runs/kvreuse.db).
        out: folder for report.md, results.csv and the PNG plots (default: <db stem>_report next
            to the DB; with --csv, <csv stem>_report next to the CSV).
        plots: also draw the PNG plots (--no-plots: report.md and results.csv only; plots an
            earlier run left in `out` are removed, so none is out of date).
        csv: instead of a DB, a results.csv that `report` wrote: redraws report.md and the plots
            from it (the DB need not be kept); the CSV itself is left as it is.
    """
    from .report import write_report, write_report_from_csv

    if csv is not None:
        if db is not None:  # None, not the default path: `--db runs/kvreuse.db --csv X` is refused too
            raise ValueError("report: give --db or --csv, not both")
        out_dir = out if out is not None else str(Path(csv).with_name(Path(csv).stem + "_report"))
        md, files = write_report_from_csv(csv, out_dir, plots=plots)
    else:
        db = DEFAULT_DB if db is None else db
        out_dir = out if out is not None else str(Path(db).with_name(Path(db).stem + "_report"))
        md, files = write_report(db, out_dir, plots=plots)
    print(md)
    print("wrote " + ", ".join(str(f) for f in files), file=sys.stderr)


def run_bench_eval(
    total: int = 400,
    workers: int | None = None,
    checkpoint: str | None = None,
    env: str = "metaworld",
    tasks: tuple[str, ...] = (),
    reuse: str = "",
    replan: int = 5,
    max_steps: int | None = None,
    preset: str = "tiny-pi05",
    device: str = "cpu",
    dtype: str = "float32",
    fast: bool = False,
    keep_absent_cameras: bool = False,
    tokenizer: str | None = None,
) -> None:
    """Throughput of the harness: `total` episodes of one setting (spread over the tasks) in a
    throw-away DB; prints episodes/s. The target is 400 testbed episodes in < 3 min on 16 cores.

    Args:
        total: episodes in all (rounded up to a whole number per task).
        reuse: a reuse setting ('key=value ...'); empty = baseline.
    """
    from .envs import check_tasks, make_env
    from .sweep import PolicySource, checkpoint_tasks, default_tasks, run_sweep

    if total < 1:  # checked here: spread over the tasks it would reach the sweep as `episodes`
        raise ValueError(f"total: expected an integer >= 1 (episodes in all), got {total}")
    e = make_env(env)
    try:  # the tasks run_sweep will pick, to spread `total` over them
        src = PolicySource(checkpoint, preset, device, fast, keep_absent_cameras, dtype, tokenizer).resolved(e.robot)
        ts = check_tasks(e, tasks) if tasks else default_tasks(e, checkpoint_tasks(src))
    finally:
        e.close()
    n_tasks = len(ts)
    per_task = -(-total // n_tasks)
    grid = one_setting(reuse, "bench-eval")
    import resource

    def cpu_s() -> float:  # this process + its finished (joined) workers
        return sum(ru.ru_utime + ru.ru_stime for ru in (resource.getrusage(resource.RUSAGE_SELF),
                                                         resource.getrusage(resource.RUSAGE_CHILDREN)))

    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "bench.db")
        plan = replace(_plan(db, env, ts, per_task, 0, 0, replan, max_steps, workers, 0, grid, not grid, True,
                             device), kept=False)  # its DB goes with the folder: a rerun starts afresh
        c0, t0 = cpu_s(), time.perf_counter()
        s = run_sweep(plan, src)
        wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    print(f"machine: {_cores()} cores; workers {plan.workers}; env {env}; policy {src.checkpoint or 'random ' + preset}")
    print(f"{s.ran} episodes ({per_task} per task x {n_tasks} tasks) in {wall:.1f} s "
          f"= {s.ran / wall:.2f} episodes/s (start-up {s.first_result_s:.1f} s); "
          f"{s.errors} env errors")
    _stop_if_all_errors(s.ran > 0 and s.errors == s.ran, s.ran)  # a rate of crashes is no throughput
    if s.ran:
        print(f"projected for 400 episodes at this rate: {400 / (s.ran / wall):.0f} s (target < 180 s on 16 cores)")
        # CPU time is what other load on a shared machine does not inflate much.
        print(f"CPU time {cpu:.1f} s = {cpu / s.ran:.2f} CPU-s per episode (start-up included); "
              f"if it scales linearly, 400 episodes on 16 idle cores: {400 * cpu / s.ran / 16:.0f} s")


def _args(f) -> dict[str, str]:
    """The entries of f's docstring's Args section: name -> its lines (the name's line and the
    continuation lines indented under it)."""
    doc = inspect.getdoc(f) or ""
    out: dict[str, str] = {}
    for line in doc.split("Args:", 1)[1].splitlines() if "Args:" in doc else []:
        if m := re.match(r"^    (\w+):", line):
            out[m.group(1)] = line
        elif line.startswith("        ") and out:
            out[next(reversed(out))] += "\n" + line
    return out


def _document_shared_options(f) -> None:
    """Append to f's Args (its docstring's last section) run_eval's entries for the options f shares
    with `kvreuse eval`: tyro's --help shows each option's entry, and one text serves both."""
    own, shared = _args(f), _args(run_eval)
    extra = [shared[p] for p in inspect.signature(f).parameters if p not in own and p in shared]
    f.__doc__ = (inspect.getdoc(f) or "").rstrip() + "\n" + "\n".join(extra) + "\n"


for _f in (run_sweep_cmd, run_bench_eval):
    _document_shared_options(_f)
