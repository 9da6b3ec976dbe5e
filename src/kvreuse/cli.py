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


class _Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (`kill`, `timeout`, a closed terminal), ended as Ctrl-C is."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_on(signum: int, _frame) -> None:
    raise _Stopped(signum)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    import signal
    import threading

    kept_handlers = {}
    # Not for serve: it installs its own SIGTERM / SIGHUP handlers in its event loop (close clients, then stop).
    if threading.current_thread() is threading.main_thread() and argv[:1] != ["serve"]:
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:  # not over an embedder's own
                kept_handlers[sig] = signal.signal(sig, _stop_on)
    try:
        _run(argv)
    finally:
        for sig, handler in kept_handlers.items():
            signal.signal(sig, handler)


def _run(argv: list[str]) -> None:
    try:  # the imports too: Ctrl-C while they load (or a model does) is one line as well
        import tyro

        tyro.extras.subcommand_cli_from_dict(_commands(), args=argv)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"kvreuse: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:
        if getattr(e, "kept", None) is None:
            raise
        # An error a long command stopped on, having kept its work (outputs.stopped_keeping): the
        # traceback (it may be a bug), then one line that says what was kept.
        import traceback

        traceback.print_exc()
        print(f"kvreuse: error: {e.what}: {type(e).__name__}: {e} ({e.kept})", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt as e:  # Ctrl-C: one line, not a traceback through the workers' machinery
        kept = " (finished episodes are in the results DB; the same command continues from there)" \
            if argv and argv[0] in ("eval", "sweep") else ""
        if getattr(e, "kept", None):  # the command says what it kept
            kept = f" ({e.kept})"
        signum = e.signum if isinstance(e, _Stopped) else 2
        what = "interrupted" if signum == 2 else f"stopped by signal {signum}"
        print(f"kvreuse: {what}{kept}", file=sys.stderr)
        raise SystemExit(128 + signum) from None


if __name__ == "__main__":
    main()
