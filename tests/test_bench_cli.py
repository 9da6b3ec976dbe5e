"""`python -m kvreuse.bench key=value ...`: typed parsing without tyro, one-line errors."""

import functools
import os

import pytest

from kvreuse import bench


@pytest.fixture
def parsed(monkeypatch):
    got = {}
    # keep run_bench's signature and type hints: main() parses against them
    monkeypatch.setattr(bench, "run_bench", functools.wraps(bench.run_bench)(lambda **kw: got.update(kw)))
    return got


def test_values_are_parsed_by_type(parsed):
    bench.main(["expert_pdl=false", "--fused-layer-norm=YES", "lm_down_tune=0", "vision_trt=no", "check",
                "no_compile", "prompt_tokens=12", "skinny_rows=none", "tol=0.5", "preset=tiny-pi0"])
    assert parsed == {"expert_pdl": False, "fused_layer_norm": True, "lm_down_tune": False, "vision_trt": False,
                      "check": True, "compile": False, "prompt_tokens": 12, "skinny_rows": None, "tol": 0.5,
                      "preset": "tiny-pi0"}


@pytest.mark.parametrize(("arg", "msg"), [("expert_pdl=maybe", "expert_pdl: expected true/false"),
                                          ("iters=x", "iters: expected an integer"),
                                          ("nosuch=1", "unknown option 'nosuch'"),
                                          ("iters", "iters: expects a value")])
def test_bad_input_is_one_line(parsed, capsys, arg, msg):
    with pytest.raises(SystemExit) as e:
        bench.main([arg])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("kvreuse.bench: error: ") and msg in err
    assert err.count("\n") == 1 and not parsed


def test_param_count_note():
    assert bench._params(1_600_000) == "1.60M" and bench._params(3_300_000_000) == "3.30B"


@pytest.mark.parametrize("argv,msg", [
    (["--warmup", "-1"], "warmup: expected an integer >= 0"),
    (["--tol", "-1"], "tol: expected a relative error > 0"),
    (["--compile-mode", "bogus"], "compile_mode: expected one of"),
    (["--lerobot-compile-mode", "x"], "lerobot_compile_mode: expected one of"),
    (["--prompt-tokens", "0"], "prompt_tokens: expected 1 .. 96"),
    (["--prompt-tokens", "97"], "prompt_tokens: expected 1 .. 96"),
    (["--variants", "sdpa/fp32,foo/bar"], "variants: expected comma-separated prefix/expert pairs"),
    (["--json-out", "."], "json_out .: is a folder"),
])
def test_kvreuse_bench_refuses_bad_options_before_building(argv, msg, monkeypatch, capsys):
    from kvreuse.cli import main

    monkeypatch.setattr(bench, "build_random", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(SystemExit) as e:
        main(["bench", "--preset", "tiny-pi05", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and msg in err[0], err


def test_check_file_and_dir_out(tmp_path):
    from kvreuse.outputs import check_dir_out, check_file_out

    (tmp_path / "f").write_text("x")
    assert check_file_out(tmp_path / "new" / "r.json", "--x") == tmp_path / "new" / "r.json"
    assert (tmp_path / "new").is_dir()  # its folder is made now, the file after the work
    assert not (tmp_path / "new" / "r.json").exists()
    assert check_file_out(tmp_path / "f", "--x").read_text() == "x"  # an existing file is left as it is
    # a folder os.access calls writable where no file can be made (/proc, for root too): found before the work
    if os.path.isdir("/proc/self"):
        with pytest.raises(ValueError, match="--x /proc/r.json: not writable"):
            check_file_out("/proc/r.json", "--x")
    for bad, msg in ((tmp_path, "is a folder"), (tmp_path / "f" / "r.json", "cannot make its folder")):
        with pytest.raises(ValueError, match=f"--x {bad}: {msg}"):
            check_file_out(bad, "--x")
    assert check_dir_out(tmp_path / "d" / "e", "--y").is_dir()
    with pytest.raises(ValueError, match="--y .*: cannot write there \\(a file is in the way\\)"):
        check_dir_out(tmp_path / "f" / "sub", "--y")


def test_bench_variants_take_auto(monkeypatch):
    class Built(Exception):
        pass

    def built(*a, **k):
        raise Built

    monkeypatch.setattr(bench, "build_random", built)  # validation passed: the model is built next
    with pytest.raises(Built):
        bench.bench("tiny-pi05", 1, 2, 10, 16, 1, 0, False, 0.02, None, False, False, False, 0.25, None, False,
                    False, 0, variants="auto/fp32,sdpa/auto")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for a CPU machine")
def test_a_full_size_checkpoint_on_the_cpu_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    """`--checkpoint` skipped the full-size refusal of the presets: 3B parameters timed on a CPU for hours."""
    import json

    import kvreuse.checkpoint as ck
    from kvreuse.cli import main
    from kvreuse.model import preset

    (tmp_path / "config.json").write_text(json.dumps({"model": preset("pi0").to_dict(), "robot": "libero"}))
    monkeypatch.setattr(ck, "load_checkpoint", lambda *a, **k: pytest.fail("the checkpoint was loaded"))
    with pytest.raises(SystemExit) as e:
        main(["bench", "--checkpoint", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err == [f"kvreuse: error: checkpoint {tmp_path} is full size: run it on a CUDA GPU "
                                         "(a tiny checkpoint runs on the CPU)"], err
