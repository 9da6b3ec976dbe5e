"""The `kvreuse` command: one tyro CLI, one subcommand per job.

Each subcommand is a plain function with typed arguments living in the module that does the
work; heavy imports (mujoco, metaworld, lerobot) stay inside those functions so `kvreuse --help`
is fast.
"""

from __future__ import annotations

import sys


def _commands() -> dict:
    from .commands import COMMANDS

    return COMMANDS


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:  # the imports too: Ctrl-C while they load (or a model does) is one line as well
        import tyro

        tyro.extras.subcommand_cli_from_dict(_commands(), args=argv)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"kvreuse: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback through the workers' machinery
        kept = " (finished episodes are in the results DB; the same command continues from there)" \
            if argv and argv[0] in ("eval", "sweep") else ""
        print(f"kvreuse: interrupted{kept}", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
