"""Registry of `kvreuse` subcommands (name -> function). Add one line per command."""

from __future__ import annotations

from .demo import run_demo

COMMANDS = {
    "demo": run_demo,
}
