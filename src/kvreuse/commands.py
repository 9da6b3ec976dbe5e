"""Registry of `kvreuse` subcommands (name -> function). Add one line per command."""

from __future__ import annotations

from .bench import run_bench
from .demo import run_demo
from .info import run_info
from .eval.cli import run_bench_eval, run_eval, run_report, run_sweep_cmd
from .train.demos import collect_demos
from .train.train import run_train
from .serve.command import run_serve
from .reuse.cli import run_compare

COMMANDS = {
    "compare": run_compare,
    "bench": run_bench,
    "demo": run_demo,
    "info": run_info,
    "eval": run_eval, "sweep": run_sweep_cmd, "report": run_report, "bench-eval": run_bench_eval,
    "demos": collect_demos,
    "train": run_train,
    "serve": run_serve,
}
