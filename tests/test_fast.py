"""The fast runtime (model/fast.py) computes what the eager model computes.

CPU, tiny presets: fused weights, the static [prefix ; suffix] buffers, the per-step time
tables and the reuse updates run here exactly as on the GPU; only graph capture and compile
are GPU-only (checked there by `kvreuse bench --check`).
"""

from __future__ import annotations

import copy

import pytest
import torch

from kvreuse.bench import bench, build_random, rel_err, synthetic_obs
from kvreuse.model import Pi0Model, preset
from kvreuse.model import fast as fast_mod
from kvreuse.model.fast import FastPi0, _bucket
from kvreuse.observation import Observation

torch.set_num_threads(1)


def _model(name: str, dtype=torch.float32) -> Pi0Model:
    return build_random(preset(name), "cpu", dtype=dtype, seed=0)


def _valid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A cache tensor's rows of valid tokens, the others zeroed: K/V (L, B, T, ...) or hidden
    (B, T, W) against the (B, T) mask. FastPi0 skips the prompt's padding past its bucket
    (prefix_rows), so the eager model's padded rows are the only ones it does not reproduce."""
    m = mask if x.dim() == 3 else mask[None]
    return x * m.reshape(*m.shape, *(1,) * (x.dim() - m.dim()))


@pytest.fixture(scope="module", params=["tiny-pi0", "tiny-pi05", "tiny-pi05/no-state"])
def setup(request):
    from test_model import config_named

    cfg = config_named(request.param)  # no-state: openpi's pi05_libero
    model = build_random(cfg, "cpu", dtype=torch.float32, seed=0)
    g = torch.Generator().manual_seed(1)
    obs = synthetic_obs(cfg, 2, "cpu", g)
    obs2 = synthetic_obs(cfg, 2, "cpu", g)
    noise = torch.randn(2, cfg.chunk_size, cfg.max_action_dim, generator=g)
    return cfg, model, FastPi0(model), obs, obs2, noise


@torch.no_grad()
def test_fast_equals_eager_fp32(setup):
    cfg, model, fast, obs, _, noise = setup
    ref = model.sample_actions(obs, noise)
    out = fast.sample_actions(obs, noise)
    assert out.shape == (2, cfg.chunk_size, cfg.max_action_dim)
    assert rel_err(out, ref) < 1e-5
    pe, pf = model.encode_prefix(obs, keep_hidden=(1,)), fast.encode_prefix(obs, keep_hidden=(1,))
    for a, b in ((pf.k, pe.k), (pf.v, pe.v), (pf.embeds, pe.embeds), (pf.hidden[1], pe.hidden[1])):
        assert a.shape == b.shape and rel_err(_valid(a, pe.mask), _valid(b, pe.mask)) < 1e-5
    assert torch.equal(pf.mask, pe.mask) and torch.equal(pf.positions, pe.positions)
    assert [(s.name, s.start, s.end) for s in pf.spans] == [(s.name, s.start, s.end) for s in pe.spans]


@torch.no_grad()
def test_split_api_is_sample_actions_bit_for_bit(setup):
    _, _, fast, obs, obs2, noise = setup
    a = fast.sample_actions(obs, noise)
    cache = fast.encode_prefix(obs)
    fast.encode_prefix(obs2)  # overwrites the static buffers: the returned cache must not care
    assert torch.equal(fast.denoise(cache, obs, noise), a)


@torch.no_grad()
def test_shallow_copy_shares_weights_and_runs(setup):
    """copy.copy works and delegates to the same model (round 6 A/B'd such a copy, given its own
    graphs, against the original); before, __getattr__ raised KeyError on the empty copy."""
    _, model, fast, obs, _, noise = setup
    twin = copy.copy(fast)
    assert twin.model is model and twin.exp is fast.exp and twin.cfg is fast.cfg
    assert torch.equal(twin.sample_actions(obs, noise), fast.sample_actions(obs, noise))


@torch.no_grad()
def test_denoise_does_not_mutate_prefix(setup):
    _, _, fast, obs, _, noise = setup
    cache = fast.encode_prefix(obs)
    before = (cache.k.clone(), cache.v.clone(), cache.mask.clone(), cache.embeds.clone())
    x1 = fast.denoise(cache, obs, noise)
    x2 = fast.denoise(cache, obs, noise)
    assert torch.equal(x1, x2)
    for a, b in zip(before, (cache.k, cache.v, cache.mask, cache.embeds)):
        assert torch.equal(a, b)


@torch.no_grad()
def test_fast_denoise_reads_an_eager_cache(setup):
    _, model, fast, obs, _, noise = setup
    cache = model.encode_prefix(obs)
    assert rel_err(fast.denoise(cache, obs, noise), model.denoise(cache, obs, noise)) < 1e-5


@torch.no_grad()
def test_weights_fused_and_eager_untouched(setup):
    cfg, model, fast, obs, _, noise = setup
    layer, w = model.llm.layers[1], fast.llm[1]
    assert torch.equal(w.qkv, torch.cat([layer.q.weight, layer.k.weight, layer.v.weight]))
    assert torch.equal(w.gate_up, torch.cat([layer.gate.weight, layer.up.weight]))
    assert w.qkv.data_ptr() != layer.q.weight.data_ptr()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    fast.sample_actions(obs, noise)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())


@torch.no_grad()
def test_updates_match_eager(setup):
    cfg, model, fast, obs, obs2, _ = setup
    p, t = cfg.vision.num_patches, cfg.prefix_len
    base_e = model.encode_prefix(obs, keep_hidden=(2,))
    base_f = fast.encode_prefix(obs, keep_hidden=(2,))
    cam1 = (cfg.cameras[1],)
    rec = torch.zeros(t, dtype=torch.bool)
    rec[p : p + 7] = True  # 7 patches of camera 1 + the prompt: padded up to a bucket
    rec[2 * p :] = True
    for r, cams in ((rec, cam1), (torch.ones(t, dtype=torch.bool), cfg.cameras), (~rec, ())):
        ue = model.update_prefix(base_e, obs2, r, cams, base_e.spans, 1)
        uf = fast.update_prefix(base_f, obs2, r, cams, base_f.spans, 1)
        assert rel_err(_valid(uf.k, ue.mask), _valid(ue.k, ue.mask)) < 1e-5
        assert rel_err(_valid(uf.v, ue.mask), _valid(ue.v, ue.mask)) < 1e-5
        assert rel_err(uf.embeds, ue.embeds) < 1e-5 and sorted(uf.hidden) == sorted(ue.hidden)
    fresh = {cfg.cameras[0]: model.embed_image(obs2.images[cfg.cameras[0]])}
    le = model.update_prefix_layers(base_e, obs2, 2, cfg.cameras, base_e.spans, 1, image_embeds=fresh)
    lf = fast.update_prefix_layers(base_f, obs2, 2, cfg.cameras, base_f.spans, 1, image_embeds=fresh)
    assert rel_err(_valid(lf.k, le.mask), _valid(le.k, le.mask)) < 1e-5
    assert rel_err(_valid(lf.v, le.mask), _valid(le.v, le.mask)) < 1e-5
    assert torch.equal(lf.k[:2], base_f.k[:2])  # lower layers reused as they were


@torch.no_grad()
def test_embed_image_and_supplied_embeds(setup):
    cfg, model, fast, obs, _, _ = setup
    cam = cfg.cameras[1]
    e = fast.embed_image(obs.images[cam])
    assert rel_err(e, model.embed_image(obs.images[cam])) < 1e-5
    ref = model.encode_prefix(obs, image_embeds={cam: e})
    got = fast.encode_prefix(obs, image_embeds={cam: e})
    assert rel_err(_valid(got.k, ref.mask), _valid(ref.k, ref.mask)) < 1e-5


@torch.no_grad()
def test_gelu_epilogue_path_computes_the_vision_tower():
    """The CUDA-only fc1 bias + GELU epilogue path, run here on the CPU, where
    torch._addmm_activation computes erf GELU instead of SigLIP's tanh GELU: the embeddings then
    differ by the two GELUs' difference (so the path ran), not more (so its shapes and weight
    layout are right)."""
    model = _model("tiny-pi0")
    cfg = model.cfg
    fast = FastPi0(model)
    assert not fast.gelu_epilogue  # off on the CPU
    fast.gelu_epilogue = True
    img = synthetic_obs(cfg, 2, "cpu", torch.Generator().manual_seed(3)).images[cfg.cameras[0]]
    err = rel_err(fast.embed_image(img), model.embed_image(img))
    assert 1e-5 < err < 1e-3, err


@torch.no_grad()
def test_bf16_fast_within_bf16_noise():
    cfg = preset("tiny-pi05")
    m32 = _model("tiny-pi05")
    m16 = _model("tiny-pi05", torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    obs = synthetic_obs(cfg, 1, "cpu", g)
    noise = torch.randn(1, cfg.chunk_size, cfg.max_action_dim, generator=g)
    ref = m32.sample_actions(obs, noise)
    e_eager = rel_err(m16.sample_actions(obs, noise), ref)
    e_fast = rel_err(FastPi0(m16).sample_actions(obs, noise), ref)
    assert e_fast <= max(1e-2, 2 * e_eager), (e_fast, e_eager)


def test_bad_input(setup):
    cfg, _, fast, obs, _, _ = setup
    cache = fast.encode_prefix(obs)
    rec = torch.ones(cfg.prefix_len, dtype=torch.bool)
    with pytest.raises(ValueError, match="run_cameras"):
        fast.update_prefix(cache, obs, rec, ("nope",), cache.spans, 1)
    with pytest.raises(ValueError, match="keep_hidden"):
        fast.update_prefix_layers(cache, obs, 2, (), cache.spans, 1)
    with pytest.raises(ValueError, match="graphs=True"):
        FastPi0(_model("tiny-pi0"), graphs=True)


def test_bucket():
    assert [_bucket(r, 1000) for r in (0, 1, 64, 65, 300, 999)] == [0, 64, 64, 128, 512, 1000]


@torch.no_grad()
def test_prefix_rows_rounds_the_prompt_up_to_a_bucket():
    model = _model("tiny-pi05")
    cfg = model.cfg
    n, t = cfg.max_token_len, cfg.prefix_len  # 96 prompt slots

    def rows(bucket, *lasts):  # the batch's prompts end at these slots
        mask = torch.zeros(len(lasts), n, dtype=torch.bool)
        for b, last in enumerate(lasts):
            mask[b, :last] = True
        return FastPi0(model, prompt_bucket=bucket).prefix_rows(mask)

    assert rows(32, 10) == t - n + 32 and rows(32, 32) == t - n + 32 and rows(32, 33) == t - n + 64
    assert rows(32, 10, 70) == t - n + 96 == t  # the batch's longest prompt decides
    assert rows(32, 0) == t - n + 32 and rows(64, 90) == t  # capped at every slot
    assert rows(0, 10) == t and rows(96, 10) == t  # off
    hole = torch.zeros(1, n, dtype=torch.bool)
    hole[0, [0, 40]] = True  # a gap in the mask: the last valid slot decides
    assert FastPi0(model, prompt_bucket=16).prefix_rows(hole) == t - n + 48
    with pytest.raises(ValueError, match="prompt_bucket"):
        FastPi0(model, prompt_bucket=-1)
    with pytest.raises(ValueError, match=r"prompt_bucket: expected an integer >= 0 .*got 32\.0"):
        FastPi0(model, prompt_bucket=32.0)  # (accepted, then the first call failed on a float slice)
    with pytest.raises(ValueError, match=r"embed_images: unknown camera\(s\) \['front'\]"):
        FastPi0(model).embed_images({"front": torch.zeros(1, 3, 8, 8)})  # it named run_cameras, not the call
    assert FastPi0(model).prompt_bucket == 64  # 96 slots: 64-slot buckets
    long = build_random(cfg.replace(max_token_len=200), "cpu", seed=0)
    assert FastPi0(long).prompt_bucket == 32  # Pi0.5's 200 slots: 32-slot buckets


@torch.no_grad()
def test_prompt_bucket_skips_the_padding_and_keeps_the_actions():
    """Prompts of several lengths in turn: the trimmed pass gives the eager actions each time,
    rows past the bucket are not computed (still zero in a fresh instance), and a longer prompt's
    rows left over from an earlier call change nothing."""
    model = _model("tiny-pi05")
    cfg = model.cfg
    n, t = cfg.max_token_len, cfg.prefix_len
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(1, cfg.chunk_size, cfg.max_action_dim, generator=g)
    short, long = (synthetic_obs(cfg, 1, "cpu", g, prompt_tokens=k) for k in (12, 90))
    fast = FastPi0(model, prompt_bucket=16)
    cache = fast.encode_prefix(short)
    assert fast.prefix_rows(short.token_mask) == t - n + 16
    assert cache.k[:, :, t - n + 16 :].abs().sum() == 0 and cache.k[:, :, : t - n + 12].abs().sum() > 0
    for obs in (short, long, short):
        ref = model.sample_actions(obs, noise)
        assert rel_err(fast.sample_actions(obs, noise), ref) < 1e-5
        assert rel_err(fast.denoise(fast.encode_prefix(obs), obs, noise), ref) < 1e-5


def _run_down_route(variant: str, seed: int, route) -> int:
    """Sets FastPi0's down-product route for this observation's rows to route(m) (m = its rows),
    runs sample_actions and encode_prefix through it and checks both against the eager model's
    (valid cache rows). Returns m."""
    model = _model(variant)
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    obs = synthetic_obs(cfg, 2, "cpu", g)
    noise = torch.randn(2, cfg.chunk_size, cfg.max_action_dim, generator=g)
    fast = FastPi0(model)
    assert not fast.lm_down_tune and fast._down_rows(2 * cfg.prefix_len) == 0  # not timed on the CPU
    m = 2 * fast.prefix_rows(obs.token_mask)
    fast.down_routes[m] = route(m)
    with torch.no_grad():
        out, cache = fast.sample_actions(obs, noise), fast.encode_prefix(obs)
        assert rel_err(out, model.sample_actions(obs, noise)) < 1e-5
        ref = model.encode_prefix(obs)
    assert rel_err(_valid(cache.k, ref.mask), _valid(ref.k, ref.mask)) < 1e-5
    return m


def test_lm_down_product_through_padded_rows_computes_the_same(monkeypatch):
    """The cuBLASLt route of the prefix LM's down product (_lt_residual over rows padded with
    zeros), forced on the CPU where no route is timed: same actions and caches as the eager model."""
    calls = []
    real = fast_mod._lt_residual
    monkeypatch.setattr(fast_mod, "_lt_residual", lambda *a: calls.append(a[1].shape) or real(*a))
    m = _run_down_route("tiny-pi0", 6, lambda m: -(-m // 128) * 128)
    assert -(-m // 128) * 128 > m
    assert calls and all(shape[0] == -(-m // 128) * 128 for shape in calls)


def test_down_product_through_a_cublaslt_configuration_route():
    """The route that runs the prefix LM's down product through one of cuBLASLt's configurations
    (_LtDown; GPU only) gets the unpadded rows and the residual: here a stand-in computes the
    same product with torch, and the actions and caches stay the eager model's."""
    shapes = []

    class TorchLt(fast_mod._LtDown):
        def __call__(self, x, act, down_t):
            m = x.shape[0] * x.shape[1]
            shapes.append((tuple(x.shape), act.shape[0]))
            return x + (act[:m] @ down_t).view(x.shape)

    assert not fast_mod.cublaslt.available()  # no CUDA here: no configuration to time
    assert fast_mod._LtDown.candidates(torch.zeros(1, 4, 8), torch.zeros(4, 16), torch.zeros(16, 8)) == []
    m = _run_down_route("tiny-pi05", 7, lambda m: TorchLt(None, None, torch.empty(0)))
    assert shapes and all(b * r == m and rows == m for (b, r, _), rows in shapes)


def test_down_route_keeps_the_fastest_only_when_clearly_faster(monkeypatch):
    """_pick_down_rows times cuBLAS's product, then the 1-D-bias route over m and over m padded to
    128 rows, and keeps a route only if it beats the first by 3% (timer faked: CUDA only)."""
    fast = FastPi0(_model("tiny-pi0"))
    m = 200  # padded: 256
    for times, want in (([10.0, 9.8, 8.0], 256), ([10.0, 9.0, 9.5], 200), ([10.0, 9.8, 9.75], 0)):
        it = iter(times)
        monkeypatch.setattr(fast_mod, "_median_ms", lambda fn, it=it: (fn(), next(it))[1])
        assert fast._pick_down_rows(m) == want


def test_bench_check_runs_on_cpu():
    rep = bench("tiny-pi0", 1, 2, 3, 8, 1, 0, True, 2e-2, None, False, False, True, 0.25, None, False, False, 0)
    assert rep.ok and rep.check["ok"]
    names = {n for _, n, _, _ in rep.rows}
    assert "full inference" in names and "denoise alone = reuse hit" in names
    hit = next(note for _, n, _, note in rep.rows if n == "ReusePolicy.infer, reuse hit (crossmodal gate)")
    assert hit.startswith("1 of 1 reused")  # the policy's hit row times hits only
    for mode in ("vision_only", "state_only", "layer_wise(split=", "partial("):
        assert {"update + denoise", "update + denoise, one call"} <= {
            n.split(": ")[1] for n in names if n.startswith(mode) and ": " in n}, mode
    part = next(note for _, n, _, note in rep.rows if n == "ReusePolicy.infer, partial reuse (one camera moved)")
    assert part.startswith("1 of 1 recomputed part") and part.endswith("1 camera pass")
    assert {"robot transform (numpy -> Observation on the device)", "Policy.infer, reuse off",
            "Policy.infer, reuse hit (crossmodal gate)"} <= names
    with pytest.raises(ValueError, match="full size"):
        bench("pi0", 1, 2, 3, 8, 1, 0, False, 2e-2, None, False, False, False, 0.25, None, False, False, 0)


def test_fast_refuses_calls_that_would_change_its_model_and_bad_hidden_layers():
    """nn.Module calls reached the eager model through __getattr__: load_state_dict left the fused
    copies stale (actions off by 0.5 relative, no error), .to(float64) returned the eager model.
    A keep_hidden past the last layer was a bare KeyError in FastPi0 and nothing in the eager model."""
    model = _model("tiny-pi0")
    fast = FastPi0(model)
    for call in (lambda: fast.load_state_dict(model.state_dict()), lambda: fast.to(torch.float64),
                 lambda: fast.half(), lambda: fast.train(), lambda: fast.with_cameras(model.cfg.cameras[:1]),
                 lambda: fast.with_robot_dims(4, 4)):  # (the last two returned the eager model)
        with pytest.raises(AttributeError, match="build a new FastPi0"):
            call()
    assert fast.eval() is fast and fast.cfg is model.cfg  # reads still reach the model
    obs = synthetic_obs(model.cfg, 1, "cpu", torch.Generator().manual_seed(0))
    depth = model.cfg.llm.depth
    msg = rf"keep_hidden: \[{depth}\] are not LM layer indices \(0 \.\. {depth - 1}\)"
    for m in (model, fast):
        with pytest.raises(ValueError, match=msg):
            m.encode_prefix(obs, keep_hidden=(depth,))
    with pytest.raises(ValueError, match="keep_hidden"):
        fast.sample_with_prefix(obs, torch.zeros(1, model.cfg.chunk_size, model.cfg.max_action_dim), keep_hidden=(-1,))
    assert set(fast.encode_prefix(obs, keep_hidden=(depth - 1,)).hidden) == {depth - 1}


def test_bench_check_fails_on_a_wrong_prefix_the_actions_miss(monkeypatch):
    """With random weights a Pi0.5's actions hardly depend on its prefix: a wrong prefix passed the
    actions' check. The prefix's K/V are checked on their own (valid rows, against float32)."""
    rep = bench("tiny-pi05", 1, 2, 3, 8, 1, 0, True, 2e-2, None, False, False, False, 0.25, None, False, False, 0)
    assert rep.ok and rep.check["prefix_kv_ok"] and rep.check["prefix_kv_fast_vs_fp32"] < 1e-2
    orig = FastPi0.encode_prefix

    def wrong(self, obs, **kw):  # one layer's keys off by a tenth of their spread
        c = orig(self, obs, **kw)
        c.k[1] += 0.1 * c.k[1].std()
        return c

    monkeypatch.setattr(FastPi0, "encode_prefix", wrong)
    rep = bench("tiny-pi05", 1, 2, 3, 8, 1, 0, True, 2e-2, None, False, False, False, 0.25, None, False, False, 0)
    assert rep.check["ok"] and not rep.check["prefix_kv_ok"] and not rep.ok


def test_speedup_notes_name_every_fast_configuration():
    """Ratios against lerobot / eager are given for the plain and the compiled fast path alike
    (round 5: the note used to divide by the uncompiled path only)."""
    from kvreuse.bench import Report, Stat, _speedups

    rep = Report("pi0", "gpu", {})
    rep.add("fast", "full inference", Stat(15.0, 14.0, 16.0, 10))
    rep.add("fast", "denoise alone = reuse hit", Stat(7.0, 6.0, 8.0, 10))
    assert _speedups(rep, 60.0) == "fast is 4.0x faster"
    rep.add("fast+compile", "full inference", Stat(12.0, 11.0, 13.0, 10))
    assert _speedups(rep, 60.0) == "fast is 4.0x faster; fast+compile is 5.0x faster"


def test_bench_table_keeps_names_whole():
    """Names were cut at 44 characters: two measurements of layer_wise (update + denoise as two calls
    and as one) printed the same label."""
    from kvreuse.bench import Report, Stat

    rep = Report("pi0", "gpu", {})
    names = ["layer_wise(split=9): update + denoise", "layer_wise(split=9): update + denoise, one call"]
    for name in names:
        rep.add("reuse", name, Stat(1.0, 1.0, 1.0, 3))
    lines = rep.table().splitlines()[2:]
    assert len(lines) == 2 and all(f"reuse: {n} " in line for n, line in zip(names, lines))


def test_lerobot_is_compiled_as_lerobot_does_and_keeps_its_precision_through_the_rounds(monkeypatch, capsys):
    """lerobot's compile_model path: fp32 matmul precision "high" and torch.compile(mode=...). The
    precision must hold for every lerobot call, rounds included (dynamo guards on it: restoring it
    early would recompile lerobot inside round 1), and come back afterwards. The long compile is
    announced before it starts."""
    from kvreuse import bench as bm

    cfg = preset("tiny-pi0")
    obs = synthetic_obs(cfg, 1, "cpu", torch.Generator().manual_seed(0))
    seen, modes = [], []

    class FakeLerobot:
        def sample_actions(self, *args, noise=None):
            seen.append(torch.get_float32_matmul_precision())

    class Ours:
        def sample_actions(self, obs, noise):
            return None

    def fake_compile(fn, mode=None):
        modes.append(mode)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    before = torch.get_float32_matmul_precision()
    rep = bm.Report("tiny-pi0", "cpu", {})
    rep.add("fast", "full inference", bm.Stat(1.0, 1.0, 1.0, 1))
    tm = lambda fn, n: bm.time_fn(fn, n, 0, "cpu")  # noqa: E731
    bm._lerobot_compiled(rep, FakeLerobot(), "pi0", cfg, obs, None, ("fast", Ours()), "max-autotune", 2, 3, tm, "cpu")
    assert modes == ["max-autotune"]
    out = capsys.readouterr().out.splitlines()
    said = next(i for i, line in enumerate(out) if "compiling pi0 with torch.compile(mode='max-autotune')" in line)
    assert said < next(i for i, line in enumerate(out) if "compile max-autotune full inference" in line)
    assert len(seen) == 2 + 3 + 2 * 10 and set(seen) == {"high"}  # 2 warm-up, 3 timed, 2 rounds of 10
    assert torch.get_float32_matmul_precision() == before
    names = [n for _, n, _, _ in rep.rows]
    assert "compile max-autotune full inference" in names and "round 2: compile max-autotune" in names


def test_side_by_side_alternates_rounds_and_pairs_them():
    """Beside lerobot, each round times ours then theirs (so drift meets both) and keeps them paired."""
    from kvreuse.bench import Stat, side_by_side

    calls = []

    def timer(fn, n):
        calls.append((fn(), n))
        return Stat(float(len(calls)), 0.0, 0.0, n)

    rounds = side_by_side(lambda: "ours", lambda: "theirs", 3, 30, 10, timer)
    assert calls == [("ours", 30), ("theirs", 10)] * 3
    assert [(o.median, t.median) for o, t in rounds] == [(1.0, 2.0), (3.0, 4.0), (5.0, 6.0)]
    assert side_by_side(lambda: 0, lambda: 0, 0, 1, 1, timer) == []


@pytest.mark.parametrize("mode", ["full", "vision_only", "state_only", "layer_wise", "partial"])
@torch.no_grad()
def test_reuse_policy_runs_on_fast_model(mode):
    """The reuse layer drives FastPi0 through the same API as Pi0Model, with the same result."""
    from kvreuse.reuse.config import ReuseConfig
    from kvreuse.reuse.policy import ReusePolicy

    cfg = preset("tiny-pi0")
    model = _model("tiny-pi0")
    g = torch.Generator().manual_seed(5)
    first = synthetic_obs(cfg, 1, "cpu", g)
    later = synthetic_obs(cfg, 1, "cpu", g)
    later.tokens, later.token_mask = first.tokens, first.token_mask  # same prompt: reuse allowed
    noise = torch.randn(1, cfg.chunk_size, cfg.max_action_dim, generator=g)
    rc = ReuseConfig(gate="always", mode=mode)
    outs = []
    for m in (model, FastPi0(model)):
        pol = ReusePolicy(m, rc)
        pol.reset()
        outs.append([pol.infer(o, noise)[0] for o in (first, later, later, first)])  # (back at the base)
    for a, b in zip(*outs):
        assert rel_err(b, a) < 1e-4


def test_attention_kind_auto_and_bad_kind():
    from kvreuse.model.fast import resolve_attn

    model = _model("tiny-pi0")
    fast = FastPi0(model)  # default "auto": no GPU here, so the fp32 matmuls for the expert
    assert (fast.prefix_attn, fast.expert_attn) == ("sdpa", "fp32")
    from kvreuse.model.kernels import HAVE_TRITON

    for expert in (False, True):  # on a GPU: the Triton kernel for both when Triton is there
        other = "fp32" if expert else "sdpa"
        assert resolve_attn("auto", torch.device("cuda"), expert=expert) == ("triton" if HAVE_TRITON else other)
        assert resolve_attn("auto", torch.device("cpu"), expert=expert) == other
    assert resolve_attn("efficient", torch.device("cpu"), expert=True) == "efficient"
    with pytest.raises(ValueError, match="expert_attn"):
        FastPi0(model, expert_attn="flash9")


def test_gpu_only_options_are_refused_on_a_cpu_model(monkeypatch):
    """Each failed mid-call ("0 active drivers", "No viable backend for scaled_dot_product_attention")
    with a traceback; the Triton ones run on Triton's CPU interpreter, as the tests here do."""
    model = _model("tiny-pi0")
    for kw in ({"prefix_attn": "cudnn"}, {"expert_attn": "efficient"}, {"lm_down_tune": True}):
        with pytest.raises(ValueError, match=f"{next(iter(kw))}=.*: need the model on a CUDA GPU"):
            FastPi0(model, **kw)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for kw in ({"expert_gemm": "chain"}, {"expert_attn": "triton"}, {"fused_layer_norm": True}, {"rope_kernel": True}):
        with pytest.raises(ValueError, match="need the model on a CUDA GPU"):
            FastPi0(model, **kw)
    FastPi0(model, prefix_attn="math", expert_attn="sdpa", lm_down_tune=False)  # these run anywhere
    with pytest.raises(ValueError, match=r"expert_gemm: expected one of .*got 'bogus'"):  # a typo: not "need a GPU"
        FastPi0(model, expert_gemm="bogus")


@pytest.mark.parametrize("name", ["tiny-pi0", "tiny-pi05"])
def test_noise_of_another_shape_is_refused(name):
    """FastPi0 copied it into its buffer by broadcasting (one row's noise for every row, or one value
    for every action dim); the eager Pi0.5 broadcast a batch-1 noise through its products."""
    model = _model(name)
    obs = synthetic_obs(model.cfg, 2, "cpu", torch.Generator().manual_seed(0))
    c = model.cfg
    for runner in (model, FastPi0(model)):
        for shape in ((1, c.chunk_size, c.max_action_dim), (c.chunk_size, c.max_action_dim), (2, c.chunk_size, 1)):
            with pytest.raises(ValueError, match=r"noise: expected shape \(2, "):
                runner.sample_actions(obs, torch.zeros(shape))


@pytest.mark.parametrize("name", ["tiny-pi0", "tiny-pi05"])
def test_inputs_of_another_shape_are_refused_not_broadcast(name):
    """FastPi0 copies images, image embeddings and caches into fixed buffers, which broadcast: a grey
    image became three channels, a batch-1 embedding or cache answered every row of a batch of 2
    (actions 1e-2 off, no error). The eager model broadcast a batch-1 cache in denoise."""
    model = _model(name)
    fast = FastPi0(model)
    c, g = model.cfg, torch.Generator().manual_seed(0)
    obs, one = synthetic_obs(c, 2, "cpu", g), synthetic_obs(c, 1, "cpu", g)
    cam, size = c.cameras[0], c.vision.image_size
    noise = torch.zeros(2, c.chunk_size, c.max_action_dim)
    with pytest.raises(ValueError, match=rf"images: expected \(B, 3, {size}, {size}\), got \(2, 1, {size}"):
        fast.embed_image(obs.images[cam][:, :1])
    with pytest.raises(ValueError, match=r"expected \(2, 3, .*got \(1, 3"):
        fast.embed_images({cam: obs.images[cam], c.cameras[1]: obs.images[c.cameras[1]][:1]})
    emb = {cam: fast.embed_image(one.images[cam])}
    with pytest.raises(ValueError, match=rf"image_embeds\['{cam}'\]: expected \(2, "):
        fast.encode_prefix(obs, image_embeds=emb)
    small = fast.encode_prefix(one)
    for runner in (model, fast):
        with pytest.raises(ValueError, match=r"prefix: expected K/V of \(layers, 2, "):
            runner.denoise(small, obs, noise)
    every = torch.ones(c.prefix_len, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"prefix: expected K/V of \(layers, 2, "):
        fast.update_prefix(small, obs, every, (), small.spans, 1)


def test_bad_compile_mode_is_refused():
    with pytest.raises(ValueError, match="compile_mode"):
        FastPi0(_model("tiny-pi0"), compile=True, compile_mode="fastest")


class _FakeTorchTensorRT:
    """Stands in for torch_tensorrt (not installed anywhere we test): compile() records its
    arguments and returns the module, so the wiring of FastPi0(vision_trt=True) runs on CPU."""

    def __init__(self):
        self.calls = []

    def compile(self, module, **kw):
        self.calls.append((module, kw))
        return module


@torch.no_grad()
def test_vision_trt_wiring_with_a_stand_in(monkeypatch):
    import sys

    fake = _FakeTorchTensorRT()
    monkeypatch.setitem(sys.modules, "torch_tensorrt", fake)
    cfg = preset("tiny-pi0")
    model = _model("tiny-pi0")
    g = torch.Generator().manual_seed(5)
    obs = synthetic_obs(cfg, 2, "cpu", g)
    noise = torch.randn(2, cfg.chunk_size, cfg.max_action_dim, generator=g)
    ref = FastPi0(model).sample_actions(obs, noise)
    fast = FastPi0(model, vision_trt=True)
    assert rel_err(fast.sample_actions(obs, noise), ref) < 1e-5
    fast.sample_actions(obs, noise)  # same shape: the engine is reused, not rebuilt
    cam = cfg.cameras[0]
    assert rel_err(fast.embed_image(obs.images[cam]), model.embed_image(obs.images[cam])) < 1e-5
    n_cams = len(cfg.cameras)
    shapes = [tuple(kw["inputs"][0].shape) for _, kw in fake.calls]
    size = cfg.vision.image_size
    assert shapes == [(n_cams * 2, 3, size, size), (2, 3, size, size)]  # all cameras batched; then one
    assert all(kw["ir"] == "dynamo" and kw["enabled_precisions"] == {model.dtype} for _, kw in fake.calls)
    assert set(fast.trt_vision.engines) == set(shapes)


def test_vision_trt_without_torch_tensorrt_says_so(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # makes `import torch_tensorrt` fail
    with pytest.raises(ValueError, match="torch_tensorrt"):
        FastPi0(_model("tiny-pi0"), vision_trt=True)


@torch.no_grad()
def test_sample_actions_runs_step0_layer_by_layer_behind_the_prefix():
    """With overlap (the default), Euler step 0's expert layer li is issued right after the
    prefix LM's layer li wrote its K/V (on CUDA on a second stream; here in that order), and the actions equal
    the back-to-back path even when the buffers hold another observation's K/V beforehand."""
    cfg = preset("tiny-pi0")
    model = _model("tiny-pi0")
    g = torch.Generator().manual_seed(7)
    obs, other = synthetic_obs(cfg, 1, "cpu", g), synthetic_obs(cfg, 1, "cpu", g)
    noise = torch.randn(1, cfg.chunk_size, cfg.max_action_dim, generator=g)
    ref = FastPi0(model, overlap=False).sample_actions(obs, noise)
    fast = FastPi0(model)
    fast.encode_prefix(other)  # stale K/V in the buffers: an expert layer run too early would read them
    order = []
    for name, tag in (("_norm_qkv_fn", "kv"), ("_lm_rest_fn", "rest"), ("_exp_fn", "exp")):
        real = getattr(fast, name)
        setattr(fast, name, lambda *a, real=real, tag=tag, **k: order.append(tag) or real(*a, **k))
    assert torch.equal(fast.sample_actions(obs, noise), ref)
    depth = cfg.llm.depth  # each step-0 expert layer right after the prefix layer's K/V
    assert order[: 3 * depth - 1] == ["kv", "exp", "rest"] * (depth - 1) + ["kv", "exp"]
    assert order[3 * depth - 1 :] == ["exp"] * depth * (cfg.num_steps - 1)


@torch.no_grad()
def test_reuse_off_policy_is_sample_actions_to_the_bit_and_embeds_in_one_pass():
    """ReusePolicy's refresh embeds its cameras through `embed_images`, one batched pass on
    FastPi0: the very pass sample_actions runs, so reuse off gives its actions bit for bit."""
    from kvreuse.reuse.config import ReuseConfig
    from kvreuse.reuse.policy import ReusePolicy

    cfg = preset("tiny-pi0")
    model = _model("tiny-pi0")
    g = torch.Generator().manual_seed(9)
    obs = synthetic_obs(cfg, 1, "cpu", g)
    noise = torch.randn(1, cfg.chunk_size, cfg.max_action_dim, generator=g)
    fast = FastPi0(model)
    passes = []
    real = fast._vision_of
    fast._vision_of = lambda st, images: passes.append(len(images)) or real(st, images)
    emb = fast.embed_images(dict(obs.images))
    assert passes == [len(cfg.cameras)] and list(emb) == list(cfg.cameras)
    cache = fast.encode_prefix(obs)
    p = cfg.vision.num_patches
    for i, cam in enumerate(cfg.cameras):
        assert torch.equal(emb[cam], cache.embeds[:, i * p : (i + 1) * p])
        assert rel_err(emb[cam], model.embed_image(obs.images[cam])) < 1e-5
    passes.clear()
    out, rec = ReusePolicy(fast, ReuseConfig()).infer(obs, noise)
    assert passes == [len(cfg.cameras)] and rec.decision == "refresh"
    assert torch.equal(out, fast.sample_actions(obs, noise))


@torch.no_grad()
def test_sample_with_prefix_is_encode_prefix_plus_denoise(setup):
    """The refresh in one call (the overlapped sample graph, then the cache copied out) gives the
    split calls' actions and cache bit for bit, hidden states included; the eager model's
    version is the two calls."""
    cfg, model, fast, obs, obs2, noise = setup
    for m in (fast, FastPi0(model, overlap=False), model):
        out, cache = m.sample_with_prefix(obs, noise, keep_hidden=(2,), call_index=4, snapshot=7)
        ref = m.encode_prefix(obs, keep_hidden=(2,))
        m.encode_prefix(obs2)  # the returned cache is the caller's, whatever runs next
        assert torch.equal(out, m.denoise(ref, obs, noise)) and torch.equal(out, m.sample_actions(obs, noise))
        for a, b in ((cache.k, ref.k), (cache.v, ref.v), (cache.hidden[2], ref.hidden[2]), (cache.mask, ref.mask),
                     (cache.embeds, ref.embeds), (cache.positions, ref.positions)):
            assert torch.equal(_valid(a, ref.mask) if a.dim() > 2 else a, _valid(b, ref.mask) if b.dim() > 2 else b)
        assert cache.call_index == 4 and {s.snapshot for s in cache.spans} == {7}


@torch.no_grad()
def test_sample_with_update_is_the_update_plus_denoise(setup):
    """A partial or layer-wise update and its denoise in one call (one graph, Euler step 0
    trailing the recomputed LM layers) give the two calls' actions and cache bit for bit, with
    overlap on and off; exactly one of recompute= / split=."""
    cfg, model, fast, obs, obs2, noise = setup
    p, t = cfg.vision.num_patches, cfg.prefix_len
    rec = torch.zeros(t, dtype=torch.bool)
    rec[p : p + 7] = True
    rec[2 * p :] = True
    fresh = {cfg.cameras[1]: fast.embed_image(obs2.images[cfg.cameras[1]])}
    for m in (fast, FastPi0(model, overlap=False)):
        base = m.encode_prefix(obs, keep_hidden=(2,))
        for kw in (dict(recompute=rec), dict(recompute=torch.ones(t, dtype=torch.bool)), dict(split=2)):
            out, cache = m.sample_with_update(base, obs2, noise, cfg.cameras[1:], base.spans, 3, image_embeds=fresh,
                                              **kw)
            if "split" in kw:
                ref = m.update_prefix_layers(base, obs2, 2, cfg.cameras[1:], base.spans, 3, image_embeds=fresh)
            else:
                ref = m.update_prefix(base, obs2, kw["recompute"], cfg.cameras[1:], base.spans, 3, image_embeds=fresh)
            assert torch.equal(out, m.denoise(ref, obs2, noise)), kw
            for a, b in ((cache.k, ref.k), (cache.v, ref.v), (cache.embeds, ref.embeds)):
                assert torch.equal(_valid(a, ref.mask), _valid(b, ref.mask)), kw
            assert torch.equal(cache.mask, ref.mask) and sorted(cache.hidden) == sorted(ref.hidden)
            assert cache.call_index == 3
        with pytest.raises(ValueError, match="exactly one"):
            m.sample_with_update(base, obs2, noise, (), base.spans, 3, recompute=rec, split=2)
        with pytest.raises(ValueError, match="keep_hidden"):
            m.sample_with_update(base, obs2, noise, (), base.spans, 3, split=1)


@torch.no_grad()
@pytest.mark.parametrize("split", [None, 2])
def test_sample_with_update_trails_the_lm_layer_by_layer(split, monkeypatch):
    """Euler step 0's expert layer li is queued right after the LM layer whose K/V it reads,
    before the LM's later layers; below a layer-wise split (the cache's K/V) it starts at once."""
    model = _model("tiny-pi0")
    cfg = model.cfg
    g = torch.Generator().manual_seed(12)
    obs, obs2 = synthetic_obs(cfg, 1, "cpu", g), synthetic_obs(cfg, 1, "cpu", g)
    noise = torch.randn(1, cfg.chunk_size, cfg.max_action_dim, generator=g)
    fast = FastPi0(model)
    base = fast.encode_prefix(obs, keep_hidden=(2,))
    log = []
    real_layers, real_exp = fast._lm_layers, fast._exp_fn

    def lm_layers(*a, **kw):
        for i in real_layers(*a, **kw):
            log.append(f"L{i}")
            yield i

    monkeypatch.setattr(fast, "_lm_layers", lm_layers)
    monkeypatch.setattr(fast, "_exp_fn", lambda *a, **kw: log.append("E") or real_exp(*a, **kw))
    rec = torch.zeros(cfg.prefix_len, dtype=torch.bool)
    rec[-10:] = True
    kw = dict(split=split) if split is not None else dict(recompute=rec)
    fast.sample_with_update(base, obs2, noise, (), base.spans, 1, **kw)
    d = cfg.llm.depth
    first = ["E", "E", "L2", "E", "L3", "E"] if split == 2 else [x for i in range(d) for x in (f"L{i}", "E")]
    assert log[: 2 * d - (2 if split else 0)] == first
    assert log.count("E") == d * cfg.num_steps


@torch.no_grad()
def test_reuse_policy_refreshes_through_sample_with_prefix_on_fast():
    """A full refresh on FastPi0 (overlap on) is one sample_with_prefix, timed as "sample"; on
    the eager model, encode_prefix then denoise, timed apart. Both give sample_actions' actions."""
    from kvreuse.reuse.config import ReuseConfig
    from kvreuse.reuse.policy import ReusePolicy

    cfg = preset("tiny-pi05")
    model = _model("tiny-pi05")
    g = torch.Generator().manual_seed(10)
    obs = synthetic_obs(cfg, 1, "cpu", g)
    noise = torch.randn(1, cfg.chunk_size, cfg.max_action_dim, generator=g)
    for m, one_call in ((FastPi0(model), True), (FastPi0(model, overlap=False), False), (model, False)):
        order = []
        if isinstance(m, FastPi0):  # its host reads come before the vision pass is queued
            for name in ("prepare", "embed_images"):
                real = getattr(m, name)
                setattr(m, name, lambda *a, real=real, name=name, **k: order.append(name) or real(*a, **k))
        out, rec = ReusePolicy(m, ReuseConfig(mode="layer_wise")).infer(obs, noise)
        assert order == (["prepare", "embed_images"] if isinstance(m, FastPi0) else [])
        assert rec.decision == "refresh" and torch.equal(out, m.sample_actions(obs, noise))
        assert (rec.timings["sample"] > 0) == one_call and (rec.timings["prefix"] > 0) != one_call
        assert (rec.timings["denoise"] > 0) != one_call


@torch.no_grad()
@pytest.mark.parametrize("variant", ["tiny-pi0", "tiny-pi05"])
@pytest.mark.parametrize("mode", ["partial", "state_only", "layer_wise"])
def test_reuse_policy_updates_through_sample_with_update_on_fast(mode, variant):
    """A partial, state-only or layer-wise call on FastPi0 with overlap is one sample_with_update,
    timed as "sample"; the same calls without overlap (the update, then denoise) give the same
    actions, plans and cache."""
    from kvreuse.reuse.config import ReuseConfig
    from kvreuse.reuse.policy import ReusePolicy

    model = _model(variant)
    cfg = model.cfg
    g = torch.Generator().manual_seed(13)
    first = synthetic_obs(cfg, 1, "cpu", g)
    later, third = synthetic_obs(cfg, 1, "cpu", g), synthetic_obs(cfg, 1, "cpu", g)
    half = cfg.vision.image_size // 2
    for o in (later, third):
        o.tokens, o.token_mask = first.tokens, first.token_mask  # same prompt: reuse allowed
        for c in cfg.cameras:  # the lower half as the first frame's: a partial plan, not every token
            o.images[c][..., half:, :] = first.images[c][..., half:, :]
    noise = torch.randn(1, cfg.chunk_size, cfg.max_action_dim, generator=g)
    runs = []
    for overlap in (True, False):
        pol = ReusePolicy(FastPi0(model, overlap=overlap), ReuseConfig(gate="always", mode=mode))
        runs.append([pol.infer(o, noise) for o in (first, later, third)] + [pol.cache])
    (*calls, cache), (*ref_calls, ref_cache) = runs
    assert torch.equal(cache.k, ref_cache.k) and torch.equal(cache.v, ref_cache.v)
    for (out, rec), (ref_out, ref_rec) in zip(calls[1:], ref_calls[1:], strict=True):
        assert rec.plan == ref_rec.plan in ("tokens", "layers") and torch.equal(out, ref_out)
        assert rec.timings["sample"] > 0 and rec.timings["prefix"] == 0 and rec.timings["denoise"] == 0
        assert ref_rec.timings["sample"] == 0 and ref_rec.timings["prefix"] > 0 and ref_rec.timings["denoise"] > 0


@torch.no_grad()
def test_prepare_reads_the_host_values_once_and_only_for_that_observation(monkeypatch):
    """FastPi0.prepare(obs) reads the spans and the prompt's rows ahead where that reads the
    device (masks on a GPU without host copies: simulated here); the next call on the same obs
    uses them (same actions and cache) instead of reading again, once; a changed mask or another
    observation is never served from them. Masks on the host are not read ahead: the call reads
    them while the GPU runs its vision pass."""
    model = _model("tiny-pi05")
    cfg = model.cfg
    g = torch.Generator().manual_seed(11)
    obs = synthetic_obs(cfg, 1, "cpu", g, prompt_tokens=20)
    noise = torch.randn(1, cfg.chunk_size, cfg.max_action_dim, generator=g)
    fast = FastPi0(model, prompt_bucket=16)
    ref_out, ref_cache = fast.sample_with_prefix(obs, noise)
    reads = []
    real_rows, real_spans = fast.prefix_rows, model.spans
    monkeypatch.setattr(fast, "prefix_rows", lambda m: reads.append("rows") or real_rows(m))
    monkeypatch.setattr(model, "spans", lambda o, snap: reads.append("spans") or real_spans(o, snap))
    fast.prepare(obs)
    assert reads == [] and fast._prepared is None  # host masks: nothing to read ahead
    monkeypatch.setattr(Observation, "on_host", lambda self, name: False)  # as if on a GPU
    fast.prepare(obs)
    assert sorted(reads) == ["rows", "spans"]
    reads.clear()
    out, cache = fast.sample_with_prefix(obs, noise, snapshot=5)
    assert reads == [] and torch.equal(out, ref_out) and torch.equal(cache.k, ref_cache.k)
    assert [(s.name, s.start, s.end, s.snapshot) for s in cache.spans] == [
        (s.name, s.start, s.end, 5) for s in ref_cache.spans]
    fast.sample_with_prefix(obs, noise)  # used once: read again
    assert sorted(reads) == ["rows", "spans"]
    fast.prepare(obs)
    obs.token_mask[:, :40] = True  # changed in place after prepare: not trusted
    ref = model.sample_actions(obs, noise)
    reads.clear()
    assert rel_err(fast.sample_actions(obs, noise), ref) < 1e-5
    assert reads == ["rows"]
    fast.prepare(obs)
    obs.token_mask = obs.token_mask.clone()  # replaced: not trusted either
    assert fast._prepared_for(obs) is None
    pi0 = FastPi0(_model("tiny-pi0"))  # no state in the prompt, one bucket: nothing to read ahead
    pi0.prepare(synthetic_obs(pi0.cfg, 1, "cpu", g))
    assert pi0.__dict__.get("_prepared") is None


def test_graph_capture_gets_cublas_workspaces_of_its_own(monkeypatch):
    """cuBLAS workspaces are cleared after the warm-up runs and again after capture, so a graph
    captures fresh ones allocated in its own pool and shares them with nobody (torch.compile's
    CUDA graphs clear them on every recording; a shared one freed under a live graph faulted the
    bench's rounds beside lerobot). torch.cuda is faked: this runs on the CPU."""
    import contextlib
    import types

    import kvreuse.model.graphs as graphs_mod

    log = []

    class Graph:
        def replay(self):
            log.append("replay")

    @contextlib.contextmanager
    def capture(graph):
        log.append("capture")
        yield

    fake = types.SimpleNamespace(
        Stream=lambda: types.SimpleNamespace(wait_stream=lambda s: None),
        current_stream=lambda: types.SimpleNamespace(wait_stream=lambda s: None),
        stream=lambda s: contextlib.nullcontext(),
        CUDAGraph=Graph,
        graph=capture,
        synchronize=lambda: None,
    )
    monkeypatch.setattr(graphs_mod.torch, "cuda", fake)
    monkeypatch.setattr(graphs_mod, "clear_cublas_workspaces", lambda: log.append("clear"))
    graphs = graphs_mod.Graphs(True)
    out = graphs.run("k", lambda: log.append("fn") or "out")
    assert out == "out"
    assert log == ["fn", "fn", "clear", "capture", "fn", "clear", "replay"]
    log.clear()
    graphs.run("k", lambda: log.append("fn"))  # captured once: replays only, no clearing
    assert log == ["replay"]


@torch.no_grad()
def test_prefix_functions_trace_whole_under_compile():
    """The functions FastPi0 compiles around the prefix LM (round 14's pending residual and
    tables) trace without graph breaks (fullgraph) and compute what they compute eagerly; the
    GPU bench's --check covers inductor itself."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    b, t, w, heads, d, s = 1, 12, 16, 2, 8, 5
    x, y = torch.randn(b, t, w, generator=g), torch.randn(b, t, w, generator=g)
    norm, qkv_w = torch.rand(w, generator=g) + 0.5, torch.randn((heads + 2) * d, w, generator=g)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[:, -3:] = False
    pos = valid.long().cumsum(-1) - 1
    cases = [
        (fast_mod._norm_qkv, (x, y, norm, qkv_w, 1e-6)),
        (fast_mod._norm_qkv, (x, None, norm, qkv_w, 1e-6)),
        (fast_mod._prefix_tables, (valid, pos, d, 10000.0, True, torch.float32)),
        (fast_mod._expert_tables, (valid, s, heads, d, 10000.0, False, True, torch.float32)),
    ]
    for fn, args in cases:
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=False)
        for a, e in zip(compiled(*args), fn(*args), strict=True):
            assert (a is None and e is None) or torch.equal(a, e)
    out, ref = fast_mod._norm_qkv(x, y, norm, qkv_w, 1e-6), fast_mod._norm_qkv(x + y, None, norm, qkv_w, 1e-6)
    assert torch.equal(out[0], x + y) and torch.equal(out[1], ref[1])  # the pending add happens first
