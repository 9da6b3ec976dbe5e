"""Registry of `kvreuse` subcommands (name -> function). Add one line per command."""

from __future__ import annotations

from .bench import run_bench
from .demo import run_demo
from .info import run_info
from .eval.cli import run_bench_eval, run_eval, run_report, run_sweep_cmd
from .serve.command import run_serve

COMMANDS = {
    "bench": run_bench,
    "demo": run_demo,
    "info": run_info,
    "eval": run_eval, "sweep": run_sweep_cmd, "report": run_report, "bench-eval": run_bench_eval,
    "serve": run_serve,
}
