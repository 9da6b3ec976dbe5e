"""`python -m kvreuse.bench key=value ...`: typed parsing without tyro, one-line errors."""

import functools

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
