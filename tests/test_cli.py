"""The `kvreuse` entry point: bad input and Ctrl-C end in one line, not a traceback."""

from __future__ import annotations

import pytest

import kvreuse.cli as cli


def _run_with(monkeypatch, name, fn, argv):
    monkeypatch.setattr(cli, "_commands", lambda: {name: fn})
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code


def test_ctrl_c_is_one_line(monkeypatch, capsys):
    def interrupted() -> None:
        raise KeyboardInterrupt

    assert _run_with(monkeypatch, "eval", interrupted, ["eval"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvreuse: interrupted (finished episodes are in the results DB")
    assert _run_with(monkeypatch, "bench", interrupted, ["bench"]) == 130
    assert capsys.readouterr().err.strip() == "kvreuse: interrupted"  # nothing is kept there


def test_value_error_is_one_line(monkeypatch, capsys):
    def bad() -> None:
        raise ValueError("episodes: expected an integer >= 1, got 0")

    assert _run_with(monkeypatch, "eval", bad, ["eval"]) == 2
    assert capsys.readouterr().err.strip() == "kvreuse: error: episodes: expected an integer >= 1, got 0"


def test_demo_runs_and_rejects_no_calls(capsys):
    cli.main(["demo", "--calls", "1"])
    out = capsys.readouterr().out
    assert "tiny-pi0:" in out and "call 0: actions (1, 16, 4)" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--calls", "0"])
    assert e.value.code == 2 and "calls: expected an integer >= 1, got 0" in capsys.readouterr().err
