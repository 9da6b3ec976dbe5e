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


def test_ctrl_c_while_the_commands_import_is_one_line(monkeypatch, capsys):
    def importing() -> dict:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_commands", importing)
    with pytest.raises(SystemExit) as e:
        cli.main(["serve"])
    assert e.value.code == 130 and capsys.readouterr().err.strip() == "kvreuse: interrupted"


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


@pytest.mark.parametrize("argv", [["serve"], ["compare", "grid"], ["compare", "actions"], ["eval", "--env", "fake"],
                                  ["train", "--demos", "none", "--out", "none"]])
def test_every_command_checks_device_before_work(argv, monkeypatch, capsys, tmp_path):
    import torch

    monkeypatch.chdir(tmp_path)  # nothing may be written here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, msg in (("tpu", "--device 'tpu': unknown device; expected "),
                        ("cuda:1", "--device 'cuda:1': CUDA is not available on this machine")):
        with pytest.raises(SystemExit) as e:
            cli.main([*argv, "--device", device])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("kvreuse: error: " + msg), err
    assert list(tmp_path.iterdir()) == []


def test_check_device_auto_and_index(monkeypatch):
    import torch

    from kvreuse.devices import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("auto", auto=True) == torch.device("cuda") and check_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"this machine has 2 CUDA device\(s\): cuda:0 .. cuda:1"):
        check_device("cuda:2")
    with pytest.raises(ValueError, match="expected cpu, cuda or cuda:N"):
        check_device("auto")  # only train takes auto
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device("auto", auto=True) == torch.device("cpu")


def test_sigterm_ends_a_run_as_ctrl_c_does(monkeypatch, capsys):
    import os
    import signal

    def killed() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal should have stopped the run")

    before = signal.getsignal(signal.SIGTERM)
    assert _run_with(monkeypatch, "sweep", killed, ["sweep"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvreuse: stopped by signal 15 (finished episodes are in the results DB")
    assert signal.getsignal(signal.SIGTERM) == before  # restored for whoever called main


@pytest.mark.parametrize("cmd", [["serve", "--port", "0"], ["compare", "actions"]])
def test_seed_out_of_range_is_one_line_naming_the_flag(cmd, capsys):
    """A seed past 2**64 - 1 (or negative) gave torch's 'Overflow when unpacking long long', naming no flag."""
    for seed in ("99999999999999999999999", "-1"):
        with pytest.raises(SystemExit):
            cli.main(cmd + ["--seed", seed])
        err = capsys.readouterr().err
        want = f"kvreuse: error: --seed: expected an integer in 0..18446744073709551615 (2**64 - 1), got {seed}"
        assert err.strip() == want


def test_every_option_has_help_text(capsys):
    """`kvreuse sweep --help` listed 20 options with no text (its docstring said "as in `kvreuse
    eval`"), bench 20, demos / train / report / demo / info / bench-eval some: every option of the
    function commands has an Args entry, which tyro prints under the option. (compare's options are
    dataclass fields, documented by their own docstrings.)"""
    import inspect

    from kvreuse.cli import main
    from kvreuse.commands import COMMANDS
    from kvreuse.eval.cli import _args

    for name, f in COMMANDS.items():
        if name == "compare":
            continue
        missing = [p for p in inspect.signature(f).parameters if p not in _args(f)]
        assert not missing, (name, missing)
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "parallel worker processes" in out and "--keep-absent-cameras" in out
