"""Checkpoints: our format round trip, reference (lerobot / openpi) layouts, loader errors,
norm stats beside reference weights, `kvreuse info`. Tiny presets only."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kvreuse.checkpoint import (
    check_checkpoint,
    checkpoint_stats,
    checkpoint_format,
    load_checkpoint,
    save_checkpoint,
)
from kvreuse.cli import main as cli_main
from kvreuse.info import describe
from kvreuse.model import ModelConfig, Pi0Model, preset
from kvreuse.observation import Observation
from kvreuse.ref_checkpoint import (
    canonical,
    detect_variant,
    load_reference,
    reference_state_dict,
    save_reference,
    to_ours,
    to_reference,
)
from kvreuse.transforms.normalize import NormStats, Stats

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=["tiny-pi0", "tiny-pi05"])
def model(request):
    torch.manual_seed(0)
    m = Pi0Model(preset(request.param)).eval()
    with torch.no_grad():
        for p in m.parameters():  # no parameter left at its 0/1 init
            p.add_(0.05 * torch.randn_like(p))
    return m


def obs_for(cfg, seed=0) -> Observation:
    g = torch.Generator().manual_seed(seed)
    size, n = cfg.vision.image_size, cfg.max_token_len
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[:, :20] = True
    return Observation(
        images={c: torch.rand(1, 3, size, size, generator=g) * 2 - 1 for c in cfg.cameras},
        image_masks={c: torch.ones(1, dtype=torch.bool) for c in cfg.cameras},
        state=torch.randn(1, cfg.max_state_dim, generator=g),
        tokens=torch.randint(4, 260, (1, n), generator=g) * mask,
        token_mask=mask,
        state_token_mask=torch.zeros(1, n, dtype=torch.bool),
        prompt=("x",),
    )


def same_weights(a: Pi0Model, b: Pi0Model) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def stats(dim=4, seed=0) -> NormStats:
    rng = np.random.default_rng(seed)
    return NormStats(Stats.of(rng.normal(size=(50, dim))), Stats.of(rng.normal(size=(50, dim))))


# ---- our format ---------------------------------------------------------------------------------


def test_own_format_round_trip(model, tmp_path):
    st = stats()
    save_checkpoint(tmp_path / "ck", model, st, "metaworld", tasks=["reach"])
    assert checkpoint_format(tmp_path / "ck") == "kvreuse"
    loaded, st2, meta = load_checkpoint(tmp_path / "ck")
    assert loaded.cfg == model.cfg and same_weights(model, loaded)
    assert meta["robot"] == "metaworld" and meta["tasks"] == ["reach"]
    np.testing.assert_array_equal(st2.actions.q99, st.actions.q99)
    obs, noise = obs_for(model.cfg), torch.randn(1, model.cfg.chunk_size, model.cfg.max_action_dim)
    assert torch.equal(loaded.sample_actions(obs, noise), model.sample_actions(obs, noise))


def test_own_format_missing_key_is_a_value_error(model, tmp_path):
    save_checkpoint(tmp_path / "ck", model, None, "metaworld")
    w = load_file(str(tmp_path / "ck" / "model.safetensors"))
    w.pop("projector.bias")
    save_file(w, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(ValueError, match="projector.bias"):
        load_checkpoint(tmp_path / "ck")


# ---- reference layouts --------------------------------------------------------------------------


@pytest.mark.parametrize("layout,tie", [("lerobot", True), ("lerobot", False), ("openpi", False)])
def test_reference_round_trip(model, tmp_path, layout, tie):
    f = save_reference(tmp_path, model, layout, tie)
    keys = load_file(str(f)).keys()
    assert all(k.startswith("model.") for k in keys) == (layout == "lerobot")
    assert any(k.endswith("lm_head.weight") for k in keys) == tie
    if layout == "openpi" and model.cfg.variant == "pi0":
        assert "time_mlp_in.weight" in keys  # openpi's name for Pi0's time MLP
    assert detect_variant(keys) == model.cfg.variant
    assert checkpoint_format(tmp_path) == "reference"
    # The config (a tiny preset here) is found from the shapes alone; file or directory.
    for path in (tmp_path, f):
        loaded, st, meta = load_checkpoint(path)
        # ... and writes a Pi0.5 state below -1 into the prompt as openpi / lerobot do (bin -1); with no
        # robot dims in its config, all padded ones (a robot narrows them: Pi0Model.with_robot_dims); a
        # prompt without the state tokenized as its pipeline does (a Pi0.5's has the state: one style)
        style = layout if model.cfg.variant == "pi0" else "kvreuse"
        assert loaded.cfg == model.cfg.replace(state_below_bins="digitize", state_dim=32, action_dim=32,
                                               prompt_style=style)
        assert same_weights(model, loaded) and st is None
        assert meta["format"] == layout
    obs, noise = obs_for(model.cfg), torch.randn(1, model.cfg.chunk_size, model.cfg.max_action_dim)
    assert torch.equal(loaded.sample_actions(obs, noise), model.sample_actions(obs, noise))


def test_reference_key_map_is_a_bijection(model):
    for name in model.state_dict():
        ref = to_reference(name)
        assert to_ours(canonical("model." + ref), model.cfg.variant) == name


# lerobot 0.6.1's names (transformers 5's PaliGemma), written out by hand: the loader's map is pinned
# to these, not to its own inverse (a swap of two same-shaped names, gate / up, round-tripped).
_PG, _EX = "model.paligemma_with_expert.paligemma.model.", "model.paligemma_with_expert.gemma_expert.model."
_VT = _PG + "vision_tower.vision_model."
LEROBOT_NAMES = {
    "vision.patch_embed.{p}": _VT + "embeddings.patch_embedding.{p}",
    "vision.pos_embed.weight": _VT + "embeddings.position_embedding.weight",
    "vision.layers.{i}.ln1.{p}": _VT + "encoder.layers.{i}.layer_norm1.{p}",
    "vision.layers.{i}.ln2.{p}": _VT + "encoder.layers.{i}.layer_norm2.{p}",
    "vision.layers.{i}.q.{p}": _VT + "encoder.layers.{i}.self_attn.q_proj.{p}",
    "vision.layers.{i}.k.{p}": _VT + "encoder.layers.{i}.self_attn.k_proj.{p}",
    "vision.layers.{i}.v.{p}": _VT + "encoder.layers.{i}.self_attn.v_proj.{p}",
    "vision.layers.{i}.o.{p}": _VT + "encoder.layers.{i}.self_attn.out_proj.{p}",
    "vision.layers.{i}.fc1.{p}": _VT + "encoder.layers.{i}.mlp.fc1.{p}",
    "vision.layers.{i}.fc2.{p}": _VT + "encoder.layers.{i}.mlp.fc2.{p}",
    "vision.post_ln.{p}": _VT + "post_layernorm.{p}",
    "projector.{p}": _PG + "multi_modal_projector.linear.{p}",
    "llm.embed.weight": _PG + "language_model.embed_tokens.weight",
    "llm.norm.weight": _PG + "language_model.norm.weight",
    **{f"{ours}.layers.{{i}}.{a}.{{p}}": f"{base}layers.{{i}}.{b}.{{p}}"
       for ours, base in (("llm", _PG + "language_model."), ("expert", _EX))
       for a, b in (("in_norm", "input_layernorm"), ("post_norm", "post_attention_layernorm"),
                    ("in_norm.dense", "input_layernorm.dense"), ("post_norm.dense", "post_attention_layernorm.dense"),
                    ("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
                    ("o", "self_attn.o_proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
                    ("down", "mlp.down_proj"))},
    "expert.norm.{p}": _EX + "norm.{p}", "expert.norm.dense.{p}": _EX + "norm.dense.{p}",
    **{f"{h}.{{p}}": f"model.{h}.{{p}}" for h in ("action_in_proj", "action_out_proj", "state_proj", "time_mlp_in",
                                                 "action_time_mlp_in", "action_time_mlp_out", "time_mlp_out")},
}


def _lerobot_name(ours: str) -> str:
    for pattern, theirs in LEROBOT_NAMES.items():
        rx = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
        m = re.fullmatch(rx, ours)
        if m:
            return theirs.format(**m.groupdict())
    raise KeyError(ours)


def test_lerobot_names_load_into_the_parameters_lerobot_means(model, tmp_path):
    """Every parameter from a file named by hand as lerobot names it, each tensor distinct."""
    sd = {_lerobot_name(k): v.clone() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "model.safetensors"))
    loaded, _, _ = load_reference(tmp_path, cfg=model.cfg)
    assert same_weights(model, loaded)
    assert set(reference_state_dict(model, "lerobot")) == set(sd)


def test_legacy_transformers_layout_and_ignored_keys(model, tmp_path):
    sd = reference_state_dict(model, "openpi")
    legacy = {}
    for k, v in sd.items():
        k = k.replace("paligemma.model.language_model.", "paligemma.language_model.model.")
        k = k.replace("paligemma.model.vision_tower.", "paligemma.vision_tower.")
        k = k.replace("paligemma.model.multi_modal_projector.", "paligemma.multi_modal_projector.")
        legacy[k] = v
    # Things a real file carries that we do not use: the expert's lm_head, buffers.
    legacy["paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.zeros(3, 2)
    legacy["paligemma_with_expert.paligemma.vision_tower.vision_model.embeddings.position_ids"] = torch.zeros(1, 4)
    save_file(legacy, str(tmp_path / "model.safetensors"))
    loaded, _, _ = load_reference(tmp_path, cfg=model.cfg)
    assert same_weights(model, loaded)


def test_old_lerobot_norm_buffers_are_its_stats(model, tmp_path):
    """lerobot before 0.4 saved its norm stats as buffers in the weights file; they used to be refused
    as unexpected keys. Unset ones (lerobot's inf) count as absent."""
    st = stats()
    sd = reference_state_dict(model, "lerobot")
    sd["normalize_inputs.buffer_observation_state.mean"] = torch.tensor(st.state.mean, dtype=torch.float32)
    sd["normalize_inputs.buffer_observation_state.std"] = torch.tensor(st.state.std, dtype=torch.float32)
    sd["normalize_targets.buffer_action.mean"] = torch.full((4,), 9.0)  # unnormalize_outputs wins
    sd["normalize_targets.buffer_action.std"] = torch.full((4,), 9.0)
    sd["unnormalize_outputs.buffer_action.mean"] = torch.tensor(st.actions.mean, dtype=torch.float32)
    sd["unnormalize_outputs.buffer_action.std"] = torch.tensor(st.actions.std, dtype=torch.float32)
    sd["normalize_inputs.buffer_observation_images_top.mean"] = torch.full((3, 1, 1), float("inf"))
    save_file(sd, str(tmp_path / "model.safetensors"))
    mapping = {"STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    (tmp_path / "config.json").write_text(json.dumps({"type": model.cfg.variant, "normalization_mapping": mapping}))
    loaded, got, _ = load_reference(tmp_path, cfg=model.cfg)
    assert same_weights(model, loaded)
    assert (got.state_mode, got.actions_mode) == ("meanstd", "meanstd")
    np.testing.assert_allclose(got.state.mean, st.state.mean, rtol=1e-6)
    np.testing.assert_allclose(got.actions.std, st.actions.std, rtol=1e-6)
    assert checkpoint_stats(tmp_path) is not None
    sd["unnormalize_outputs.buffer_action.mean"] = torch.full((4,), float("inf"))  # unset: absent, not a stat
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lerobot buffers unnormalize_outputs.buffer_action\]: missing \['mean'\]"):
        load_reference(tmp_path, cfg=model.cfg)


def test_several_asset_stats_say_how_to_pick_one(tiny, tmp_path):
    save_reference(tmp_path, tiny, "openpi")
    for asset in ("droid", "trossen"):
        (tmp_path / "assets" / asset).mkdir(parents=True)
        (tmp_path / "assets" / asset / "norm_stats.json").write_text(json.dumps({"norm_stats": stats().to_dict()}))
    with pytest.raises(ValueError, match=re.escape(f"copy the one to use to {tmp_path / 'norm_stats.json'}")):
        load_reference(tmp_path)
    (tmp_path / "norm_stats.json").write_text((tmp_path / "assets" / "droid" / "norm_stats.json").read_text())
    assert load_reference(tmp_path)[1] is not None


def test_loaded_dtype_and_device(model, tmp_path):
    save_reference(tmp_path, model, "lerobot")
    loaded, _, _ = load_reference(tmp_path, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert all(p.device.type == "cpu" for p in loaded.parameters())


# ---- loader errors ------------------------------------------------------------------------------


def _write(tmp_path, sd):
    save_file(sd, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_missing_key_error(model, tmp_path):
    sd = reference_state_dict(model)
    gone = "model.paligemma_with_expert.paligemma.model.multi_modal_projector.linear.bias"
    sd.pop(gone)
    with pytest.raises(ValueError) as e:
        load_reference(_write(tmp_path, sd), cfg=model.cfg)
    msg = str(e.value)
    assert "missing (1)" in msg and gone.removeprefix("model.") in msg
    assert "unexpected" not in msg and "wrong shape" not in msg and "\n" not in msg


def test_unexpected_key_error(model, tmp_path):
    sd = reference_state_dict(model)
    sd["model.some_new_head.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match=r"unexpected \(1\): model\.some_new_head\.weight"):
        load_reference(_write(tmp_path, sd), cfg=model.cfg)


def test_wrong_shape_error(model, tmp_path):
    sd = reference_state_dict(model)
    k = "model.action_out_proj.weight"
    sd[k] = torch.zeros(3, sd[k].shape[1])
    with pytest.raises(ValueError, match=r"wrong shape \(1\): model\.action_out_proj\.weight: file \(3, "):
        load_reference(_write(tmp_path, sd), cfg=model.cfg)


def test_variant_mismatch_error(model, tmp_path):
    save_reference(tmp_path, model)
    other = preset("tiny-pi05" if model.cfg.variant == "pi0" else "tiny-pi0")
    with pytest.raises(ValueError) as e:
        load_reference(tmp_path, cfg=other)
    msg = str(e.value)
    assert f"the file holds a {model.cfg.variant} model, the config asks for {other.variant}" in msg
    assert "missing (" in msg and "unexpected (" in msg  # all problems in the one error


def test_all_problems_in_one_error(model, tmp_path):
    sd = reference_state_dict(model)
    sd.pop("model.action_in_proj.bias")
    sd["model.extra.weight"] = torch.zeros(1)
    sd["model.action_out_proj.bias"] = torch.zeros(7)
    with pytest.raises(ValueError) as e:
        load_reference(_write(tmp_path, sd), cfg=model.cfg)
    msg = str(e.value)
    assert "missing (1)" in msg and "unexpected (1)" in msg and "wrong shape (1)" in msg


def test_unknown_variant_and_bad_paths(tmp_path):
    _write(tmp_path, {"model.action_in_proj.weight": torch.zeros(2),  # Pi0 keys, neither variant's
                      "model.paligemma_with_expert.paligemma.model.language_model.norm.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="cannot tell Pi0 from Pi0.5"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="no such file"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"\x80\x04not a pickle we would ever open")
    with pytest.raises(ValueError, match="expected a .safetensors file"):
        load_checkpoint(tmp_path / "weights.bin")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "bad.safetensors")


def test_directories_without_model_safetensors_say_what_they_hold(tiny, tmp_path, capsys):
    """A pickle, sharded weights or another .safetensors name: the error says what is there and what
    to do; the pickle is never opened."""
    cases = {
        "bin": (["pytorch_model.bin"], "it holds pytorch_model.bin: pickle checkpoints are never read"),
        "pt": (["model.pt", "policy_preprocessor_step_3_normalizer_processor.safetensors"],
               "it holds model.pt: pickle"),
        "shards": (["model-00001-of-00002.safetensors", "model.safetensors.index.json"],
                   "sharded weights (model-00001-of-00002.safetensors, model.safetensors.index.json): merge them"),
        "renamed": (["weights.safetensors"], "pass one of its .safetensors files (weights.safetensors)"),
    }
    for name, (files, expected) in cases.items():
        d = tmp_path / name
        d.mkdir()
        for f in files:
            (d / f).write_bytes(b"\x80\x04 not opened")
        all_readers_fail(d, re.escape(f"checkpoint {d}: no model.safetensors") + ".*" + re.escape(expected), capsys)


def test_unrelated_safetensors_is_not_a_pi0_checkpoint(tmp_path, capsys):
    _write(tmp_path, {"encoder.weight": torch.zeros(2), "decoder.bias": torch.zeros(2)})
    all_readers_fail(tmp_path, re.escape(f"checkpoint {tmp_path / 'model.safetensors'}: not a Pi0 / Pi0.5 "
                                         "checkpoint (none of its 2 keys") + ".*decoder.bias, encoder.weight", capsys)


def test_another_models_checkpoint_is_named_as_such(tiny, tmp_path, capsys):
    """SmolVLA shares Pi0's head names (state_proj, action_in_proj, ...): it is not a Pi0 missing
    hundreds of keys but another model, and its config.json's type says which."""
    vlm = "model.vlm_with_expert.vlm.model.text_model.layers"
    sd = {f"{vlm}.{i}.mlp.up_proj.weight": torch.zeros(2) for i in range(20)}
    sd.update({f"model.{k}.weight": torch.zeros(2) for k in ("state_proj", "action_in_proj", "action_time_mlp_in")})
    _write(tmp_path, sd)
    (tmp_path / "config.json").write_text(json.dumps({"type": "smolvla"}))
    all_readers_fail(tmp_path, re.escape(f"checkpoint {tmp_path / 'model.safetensors'}: not a Pi0 / Pi0.5 checkpoint "
                                         "(its config.json says type 'smolvla'; only 3 of its 23 keys are") +
                     ".*; it has model.vlm_with_expert", capsys)


def test_config_type_must_match_the_weights(tiny, tmp_path, capsys):
    """A lerobot config.json of type pi05 over Pi0 weights: its other fields (prompt length...) are
    a Pi0.5's; it loaded silently as a Pi0."""
    save_reference(tmp_path, tiny)
    (tmp_path / "config.json").write_text(json.dumps({"type": "pi05"}))
    all_readers_fail(tmp_path, re.escape(f"checkpoint {tmp_path / 'config.json'}: says type 'pi05' but its weights "
                                         "model.safetensors are a pi0 model"), capsys)
    (tmp_path / "config.json").write_text(json.dumps({"type": "pi0"}))
    check_checkpoint(tmp_path)
    # another lerobot policy over weights that read as a Pi0 (pi0_fast): it failed as "cannot tell Pi0
    # from Pi0.5" or loaded, never naming its type
    (tmp_path / "config.json").write_text(json.dumps({"type": "pi0_fast"}))
    all_readers_fail(tmp_path, re.escape(f"checkpoint {tmp_path / 'config.json'}: says type 'pi0_fast'; kvreuse "
                                         "runs lerobot's pi0 and pi05"), capsys)


def test_a_reference_file_without_an_action_horizon_says_which_it_runs(tmp_path, capsys):
    """openpi's PyTorch trainer writes no config.json: an openpi pi05_libero (action_horizon 10) ran
    with the preset's chunk (50 at full size), every action changed, nothing said. With LIBERO's stats
    it runs pi05_libero's 10; any file without a horizon gets a note naming the chunk it assumes."""
    from kvreuse.checkpoint import print_checkpoint_notes

    torch.manual_seed(0)
    save_reference(tmp_path, Pi0Model(preset("tiny-pi05")).eval(), "openpi")
    assert load_checkpoint(tmp_path)[0].cfg.chunk_size == preset("tiny-pi05").chunk_size
    print_checkpoint_notes(tmp_path)
    assert "no action horizon in a config.json beside it; it runs openpi's default chunk" in capsys.readouterr().err
    st = stats(dim=8)
    (tmp_path / "assets" / "physical-intelligence" / "libero").mkdir(parents=True)
    (tmp_path / "assets" / "physical-intelligence" / "libero" / "norm_stats.json").write_text(
        json.dumps({"norm_stats": {"state": st.state.to_dict(), "actions": st.actions.to_dict()}}))
    assert load_checkpoint(tmp_path)[0].cfg.chunk_size == 10
    print_checkpoint_notes(tmp_path)
    assert "runs 10 actions per chunk, as openpi's pi05_libero config trains it" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"action_horizon": 12}))
    assert load_checkpoint(tmp_path)[0].cfg.chunk_size == 12
    print_checkpoint_notes(tmp_path)
    assert "action horizon" not in capsys.readouterr().err


def _lerobot_stats(d, st: Stats, act: Stats, keys=("mean", "std")):
    """Norm stats as lerobot 0.6.1 saves them: the preprocessor's normalizer (state and action)
    and the postprocessor's unnormalizer (action); `keys` only (a dataset without quantiles)."""
    for name, groups in (("policy_preprocessor_step_3_normalizer_processor", (("observation.state", st),
                                                                            ("action", act))),
                         ("policy_postprocessor_step_0_unnormalizer_processor", (("action", act),))):
        save_file({f"{prefix}.{k}": torch.tensor(getattr(s, k), dtype=torch.float32)
                   for prefix, s in groups for k in keys}, str(d / f"{name}.safetensors"))


def _mapping(d, state, action):
    (d / "config.json").write_text(json.dumps({"type": "pi05", "normalization_mapping": {
        "VISUAL": "IDENTITY", "STATE": state, "ACTION": action}}))


@pytest.mark.parametrize("state,action", [("MEAN_STD", "MEAN_STD"), ("quantiles", "mean_std"),
                                          ("MEAN_STD", "QUANTILES")])
def test_lerobot_normalization_mapping_sets_each_sides_mode(state, action, tmp_path, capsys):
    """lerobot trains a Pi0.5 with MEAN_STD where the dataset lacks quantiles (and either side may be
    set alone): read from config.json (any case), each side needs its mode's stats and is applied
    with its mode. It was refused (86c6635), before that normalized with quantiles, wrongly."""
    torch.manual_seed(0)
    save_reference(tmp_path, Pi0Model(preset("tiny-pi05")))
    st = stats()
    want = ("quantile" if state.upper() == "QUANTILES" else "meanstd",
            "quantile" if action.upper() == "QUANTILES" else "meanstd")
    _lerobot_stats(tmp_path, st.state, st.actions, ("mean", "std", "q01", "q99"))
    _mapping(tmp_path, state, action)
    _, loaded, _ = load_checkpoint(tmp_path)
    assert (loaded.state_mode, loaded.actions_mode) == want
    names = {"meanstd": "MEAN_STD (mean/std)", "quantile": "QUANTILES (q01/q99)"}
    assert (f"normalization: state {names[want[0]]}, actions {names[want[1]]} (config.json normalization_mapping)"
            in describe(tmp_path))
    # Only the stats each side's mode needs are required, with the one-line error naming the file.
    for prefix, mode in (("observation.state", want[0]), ("action", want[1])):
        need = {"meanstd": "std", "quantile": "q99"}[mode]
        other = {"meanstd": "q99", "quantile": "std"}[mode]
        for f in tmp_path.glob("policy_*.safetensors"):
            sd = load_file(str(f))
            save_file({k: v for k, v in sd.items() if k != f"{prefix}.{other}"}, str(f))
        check_checkpoint(tmp_path)  # the other mode's stat is not needed
        for f in tmp_path.glob("policy_*.safetensors"):
            sd = load_file(str(f))
            save_file({k: v for k, v in sd.items() if k != f"{prefix}.{need}"}, str(f))
        all_readers_fail(tmp_path, rf"norm stats .*\[{re.escape(prefix)}\]: missing \['{need}'\] for "
                         rf"{'MEAN_STD' if mode == 'meanstd' else 'QUANTILES'} \(has ", capsys)
        _lerobot_stats(tmp_path, st.state, st.actions, ("mean", "std", "q01", "q99"))


@pytest.mark.parametrize("variant", ["tiny-pi0", "tiny-pi05"])
@pytest.mark.parametrize("mode", ["MIN_MAX", "QUANTILE10", "IDENTITY", "median", 3])
def test_unsupported_normalization_mapping_is_one_error(variant, mode, tmp_path, capsys):
    """A mode kvreuse does not apply (lerobot's MIN_MAX, QUANTILE10, IDENTITY for state or actions,
    or no mode at all) is refused before anything loads, naming config.json and the field."""
    torch.manual_seed(0)
    save_reference(tmp_path, Pi0Model(preset(variant)))
    cfg = tmp_path / "config.json"
    for side in ("STATE", "ACTION"):
        cfg.write_text(json.dumps({"normalization_mapping": {"VISUAL": "IDENTITY", side: mode}}))
        all_readers_fail(tmp_path, re.escape(f"checkpoint {cfg}: normalization_mapping: {side} {mode!r} is not "
                                             "supported; kvreuse normalizes the state and actions with MEAN_STD or "
                                             "QUANTILES"), capsys)
    cfg.write_text(json.dumps({"normalization_mapping": ["MEAN_STD"]}))
    all_readers_fail(tmp_path, re.escape(f"checkpoint {cfg}: normalization_mapping: expected an object"), capsys)
    # lerobot's normalizer also normalizes images where VISUAL says so: kvreuse fed them raw, silently
    cfg.write_text(json.dumps({"normalization_mapping": {"VISUAL": "MEAN_STD"}}))
    all_readers_fail(tmp_path, re.escape(f"checkpoint {cfg}: normalization_mapping: VISUAL 'MEAN_STD' is not "
                                         "supported; kvreuse feeds images unnormalized"), capsys)
    # absent keys or mapping: the variant's default
    for config in ({"normalization_mapping": {"VISUAL": "IDENTITY"}}, {}):
        cfg.write_text(json.dumps(config))
        check_checkpoint(tmp_path)


def test_norm_modes_survive_our_checkpoint(tiny, tmp_path):
    """A model trained from (or saved with) such stats keeps their modes in our norm_stats.json;
    dropped, the checkpoint would be read back with the variant's default."""
    st = stats()
    st.state_mode, st.actions_mode = "quantile", "meanstd"
    ck = save_checkpoint(tmp_path / "ck", tiny, st, "metaworld")
    _, loaded, _ = load_checkpoint(ck)
    assert (loaded.state_mode, loaded.actions_mode) == ("quantile", "meanstd")
    assert "normalization: state QUANTILES (q01/q99), actions MEAN_STD (mean/std) (norm_stats.json)" in describe(ck)
    d = json.loads((ck / "norm_stats.json").read_text())
    d["actions_mode"] = "minmax"
    (ck / "norm_stats.json").write_text(json.dumps(d))
    bad = re.escape(f"checkpoint {ck / 'norm_stats.json'}: ") + ".*actions_mode 'minmax'"
    with pytest.raises(ValueError, match=bad):
        load_checkpoint(ck)


def test_config_json_dims_that_disagree_with_the_weights_are_named(tiny, tmp_path, capsys):
    """A tiny file whose config.json sets another max_state_dim: the error was the full-size preset's
    (hundreds of missing and wrong-shape keys), not the one head that disagrees and why."""
    save_reference(tmp_path, tiny)
    (tmp_path / "config.json").write_text(json.dumps({"type": "pi0", "max_state_dim": 24}))
    w = tiny.state_proj.weight.shape[0]
    all_readers_fail(tmp_path, re.escape(f"checkpoint {tmp_path / 'model.safetensors'} does not fit the pi0 config: "
                                         f"wrong shape (1): model.state_proj.weight: file ({w}, 32) vs model ({w}, 24)"
                                         "; config.json sets max_state_dim=24") + "$", capsys)
    sd = reference_state_dict(tiny)
    sd.update({f"model.extra.{i}": torch.zeros(1) for i in range(20)})
    _write(tmp_path, sd)
    (tmp_path / "config.json").unlink()
    all_readers_fail(tmp_path, re.escape("does not fit the pi0 config: unexpected (20): model.extra.0, ") +
                     r"[^;]* and 12 more$", capsys)


@pytest.mark.parametrize("config,expected", [
    ({"chunk_size": 0}, "chunk_size: expected an integer >= 1, got 0"),
    ({"num_inference_steps": 2.5}, "num_inference_steps: expected an integer >= 1, got 2.5"),  # ran 2 steps
    ({"tokenizer_max_length": "48"}, "tokenizer_max_length: expected an integer >= 1, got '48'"),  # was ignored
    ({"max_period": -4.0}, "max_period: expected a finite number > 0, got -4.0"),
    ({"max_period": float("inf")}, "max_period: expected a finite number > 0, got inf"),  # JSON's Infinity
    ({"chunk_size": float("inf")}, "chunk_size: expected an integer >= 1, got inf"),  # was an OverflowError
    ({"input_features": {"observation.state": {"type": "STATE", "shape": ["x"]}}},
     "observation.state shape: expected an integer >= 1, got 'x'"),  # a ValueError naming no file
    ({"input_features": [1]}, "input_features: expected an object of features"),  # an AttributeError
    ({"discrete_state_input": "no"}, "discrete_state_input: expected true or false, got 'no'"),
    # lerobot's relative actions: the deltas would have been returned as positions
    ({"use_relative_actions": True}, "use_relative_actions is true; kvreuse runs absolute actions only"),
])
def test_reference_config_json_values_are_checked(tiny, tmp_path, capsys, config, expected):
    save_reference(tmp_path, tiny)
    (tmp_path / "config.json").write_text(json.dumps(config))
    all_readers_fail(tmp_path, re.escape(f"checkpoint {tmp_path / 'config.json'}: {expected}"), capsys)


def test_one_shard_given_as_the_weights(tiny, tmp_path, capsys):
    f = save_reference(tmp_path / "model-00001-of-00002.safetensors", tiny)
    all_readers_fail(f, re.escape(f"checkpoint {f}: one shard of sharded weights; merge the shards"), capsys)


def test_full_size_file_is_checked_on_the_meta_device(tmp_path):
    # A tiny file against the full-size config: shapes are compared without building it for real.
    torch.manual_seed(0)
    save_reference(tmp_path, Pi0Model(preset("tiny-pi0")))
    with pytest.raises(ValueError, match=r"does not fit the pi0 config: missing \(\d+\).*wrong shape"):
        load_reference(tmp_path, cfg=preset("pi0"))


# ---- reference config and norm stats ------------------------------------------------------------


def test_lerobot_config_json_sets_lengths_and_cameras(model, tmp_path):
    save_reference(tmp_path, model)
    cfg = model.cfg
    (tmp_path / "config.json").write_text(json.dumps({
        "type": cfg.variant, "chunk_size": 8, "num_inference_steps": 4,
        "input_features": {
            "observation.images.top": {"type": "VISUAL", "shape": [3, 128, 128]},
            "observation.images.hand": {"type": "VISUAL", "shape": [3, 128, 128]},
            "observation.state": {"type": "STATE", "shape": [6]},
        },
        "output_features": {"action": {"type": "ACTION", "shape": [5]}},
    }))
    loaded, _, _ = load_checkpoint(tmp_path)
    c = loaded.cfg
    assert (c.chunk_size, c.num_steps, c.cameras, c.state_dim, c.action_dim) == (8, 4, ("top", "hand"), 6, 5)
    assert "cameras: top, hand" in describe(tmp_path)


# openpi: assets/<asset_id>/norm_stats.json; LIBERO's asset id is a repo id with a slash.
@pytest.mark.parametrize("asset_id", ["robot", "physical-intelligence/libero"])
def test_openpi_norm_stats_json(model, tmp_path, asset_id):
    save_reference(tmp_path, model, "openpi")
    st = stats(dim=5)
    (tmp_path / "assets" / asset_id).mkdir(parents=True)
    (tmp_path / "assets" / asset_id / "norm_stats.json").write_text(
        json.dumps({"norm_stats": {"state": st.state.to_dict(), "actions": st.actions.to_dict()}}))
    _, loaded, _ = load_checkpoint(tmp_path)
    np.testing.assert_allclose(loaded.state.mean, st.state.mean)
    np.testing.assert_allclose(loaded.actions.q01, st.actions.q01)


@pytest.mark.parametrize("variant", ["tiny-pi0", "tiny-pi05"])
def test_openpi_null_quantiles_count_as_absent(variant, tmp_path):
    """openpi's NormStats has optional q01 / q99, written as null: they read as one NaN, and a Pi0
    (mean / std) was refused as "the state stats have 1 dims ... another robot's stats"."""
    from kvreuse.policy import check_stats
    from kvreuse.transforms.robot import robot_spec

    torch.manual_seed(0)
    save_reference(tmp_path, Pi0Model(preset(variant)).eval(), "openpi")
    st = {k: {**getattr(stats(), k).to_dict(), "q01": None, "q99": None} for k in ("state", "actions")}
    (tmp_path / "assets" / "robot").mkdir(parents=True)
    (tmp_path / "assets" / "robot" / "norm_stats.json").write_text(json.dumps({"norm_stats": st}))
    if variant == "tiny-pi05":  # its mode needs them: the error says so
        with pytest.raises(ValueError, match=r"missing \['q01', 'q99'\]"):
            load_checkpoint(tmp_path)
        return
    _, loaded, _ = load_checkpoint(tmp_path)
    assert loaded.state.q01.shape == (4,) and np.isnan(loaded.state.q01).all()
    check_stats(loaded, robot_spec("metaworld"))


def test_openpi_pi05_with_libero_stats_runs_without_its_state(tmp_path, capsys):
    """openpi's pi05_libero keeps the state out (discrete_state_input=False) and its converter does
    not record that: an openpi Pi0.5 with LIBERO's norm stats loads so, and says so; a config.json
    that names the field wins."""
    from kvreuse.checkpoint import print_checkpoint_notes
    from kvreuse.eval.sweep import PolicySource, policy_identity

    torch.manual_seed(0)
    save_reference(tmp_path, Pi0Model(preset("tiny-pi05")).eval(), "openpi")
    with_state = policy_identity(PolicySource(str(tmp_path)))
    st = stats(dim=5)
    (tmp_path / "assets" / "physical-intelligence" / "libero").mkdir(parents=True)
    (tmp_path / "assets" / "physical-intelligence" / "libero" / "norm_stats.json").write_text(
        json.dumps({"norm_stats": {"state": st.state.to_dict(), "actions": st.actions.to_dict()}}))
    m, loaded, _ = load_checkpoint(tmp_path)
    assert loaded is not None and not m.cfg.state_in_prompt and m.cfg.suffix_len == m.cfg.chunk_size
    assert "no state input (discrete_state_input false)" in describe(tmp_path)
    print_checkpoint_notes(tmp_path)
    assert "runs without its state" in capsys.readouterr().err
    assert "+no-state-input" in policy_identity(PolicySource(str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"discrete_state_input": True, "action_horizon": 10}))
    m, _, _ = load_checkpoint(tmp_path)
    assert m.cfg.state_in_prompt
    print_checkpoint_notes(tmp_path)
    assert capsys.readouterr().err == ""
    # the id without the tag is the one every run before the option had
    assert policy_identity(PolicySource(str(tmp_path))).split("+")[0] == with_state.split("+")[0]
    assert "no-state-input" not in policy_identity(PolicySource(str(tmp_path)))


def test_openpi_pi0_with_libero_stats_adds_the_state_back_to_its_delta_actions(tmp_path, capsys, monkeypatch):
    """openpi's pi0_libero trains with extra_delta_transform: its first 6 actions are offsets from the
    state (DeltaActions(make_bool_mask(6, -1))), and openpi's AbsoluteActions adds the state back after
    unnormalizing. kvreuse returned the offsets as actions. An openpi Pi0 with LIBERO's norm stats now
    loads with that mask, and says so; a config.json delta_action_mask wins."""
    from kvreuse.checkpoint import print_checkpoint_notes
    from kvreuse.eval.sweep import PolicySource, policy_identity
    from kvreuse.policy import Policy
    from kvreuse.transforms import robot

    torch.manual_seed(0)
    save_reference(tmp_path, Pi0Model(preset("tiny-pi0")).eval(), "openpi")
    absolute = policy_identity(PolicySource(str(tmp_path)))
    st = stats(dim=8)
    libero = tmp_path / "assets" / "physical-intelligence" / "libero"
    libero.mkdir(parents=True)
    libero.joinpath("norm_stats.json").write_text(
        json.dumps({"norm_stats": {"state": st.state.to_dict(), "actions": st.actions.to_dict()}}))
    mask = (True,) * 6 + (False,)
    assert load_checkpoint(tmp_path)[0].cfg.delta_action_mask == mask
    assert "dims [0, 1, 2, 3, 4, 5] as offsets from the state's" in describe(tmp_path)
    print_checkpoint_notes(tmp_path)
    assert "first 6 actions as offsets from the state" in capsys.readouterr().err
    assert "+delta@1111110" in policy_identity(PolicySource(str(tmp_path)))
    # a DB written before the tag (and +cfg@) holds such runs under the id without it: named by the note
    assert "delta@" not in policy_identity(PolicySource(str(tmp_path)), 2)
    # LIBERO's dims over the tiny model's cameras
    monkeypatch.setitem(robot.ROBOTS, "libero8", robot.RobotSpec(
        "libero8", (("observation/image", "base"), ("observation/wrist_image", "wrist")), state_dim=8, action_dim=7))
    pol = Policy.from_checkpoint(tmp_path, robot="libero8")
    rng = np.random.default_rng(0)
    raw = {"observation/image": rng.integers(0, 255, (128, 128, 3), dtype=np.uint8),
           "observation/wrist_image": rng.integers(0, 255, (128, 128, 3), dtype=np.uint8),
           "observation/state": rng.standard_normal(8), "prompt": "put the bowl on the plate"}
    noise = pol.model.make_noise(1, torch.Generator().manual_seed(0))
    a, _ = pol.infer(raw, noise.clone())
    out = pol.model.sample_actions(pol.transform(raw), noise.clone())[0, :, :7].numpy().astype(np.float64)
    offsets = out * (st.actions.std[:7] + 1e-6) + st.actions.mean[:7]  # Pi0: mean/std
    np.testing.assert_allclose(a[:, :6], offsets[:, :6] + raw["observation/state"][:6], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a[:, 6], offsets[:, 6], rtol=1e-5, atol=1e-5)  # the gripper stays absolute
    # training targets are the offsets from the state of the observation a chunk answers (one for all of
    # it): normalize_actions inverts actions()
    targets = pol.transform.normalize_actions(a[None], raw["observation/state"][None])
    np.testing.assert_allclose(targets[0, :, :7], out, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="the observation's state is needed"):
        pol.transform.actions(torch.from_numpy(out[None]).float())
    (tmp_path / "config.json").write_text(json.dumps({"delta_action_mask": [], "action_horizon": 16}))
    assert load_checkpoint(tmp_path)[0].cfg.delta_action_mask == ()
    print_checkpoint_notes(tmp_path)
    assert capsys.readouterr().err == ""
    assert "delta@" not in policy_identity(PolicySource(str(tmp_path)))
    assert policy_identity(PolicySource(str(tmp_path))).split("+")[0] == absolute.split("+")[0]
    (tmp_path / "config.json").write_text(json.dumps({"delta_action_mask": [1, 1]}))
    with pytest.raises(ValueError, match="delta_action_mask: expected a list of true / false"):
        load_checkpoint(tmp_path)


def test_lerobot_processor_stats(model, tmp_path):
    save_reference(tmp_path, model, "lerobot")
    st = stats(dim=6)
    pre = {}
    for prefix, s in (("observation.state", st.state), ("action", st.actions)):
        for k in ("mean", "std", "q01", "q99", "min", "max"):
            pre[f"{prefix}.{k}"] = torch.tensor(getattr(s, k, s.mean), dtype=torch.float32)
    pre["observation.images.top.mean"] = torch.zeros(3, 1, 1)
    save_file(pre, str(tmp_path / "policy_preprocessor_step_5_normalizer_processor.safetensors"))
    _, loaded, _ = load_checkpoint(tmp_path)
    np.testing.assert_allclose(loaded.state.std, st.state.std, rtol=1e-6)
    np.testing.assert_allclose(loaded.actions.q99, st.actions.q99, rtol=1e-6)
    # Stats the variant's normalization needs must be there.
    need = "q01" if model.cfg.variant == "pi05" else "mean"
    pre.pop(f"action.{need}")
    save_file(pre, str(tmp_path / "policy_preprocessor_step_5_normalizer_processor.safetensors"))
    with pytest.raises(ValueError, match=f"missing \\['{need}'\\]"):
        load_checkpoint(tmp_path)


# ---- kvreuse info -------------------------------------------------------------------------------


def test_info_on_both_formats(model, tmp_path, capsys):
    save_checkpoint(tmp_path / "ours", model, stats(), "metaworld")
    save_reference(tmp_path / "ref", model, "lerobot", tie=True)
    cfg = model.cfg
    for path, fmt, robot in ((tmp_path / "ours", "kvreuse", "metaworld"), (tmp_path / "ref", "lerobot", "not recorded")):
        cli_main(["info", str(path)])
        out = capsys.readouterr().out
        assert f"format: {fmt}" in out and f"variant: {cfg.variant}" in out and f"robot: {robot}" in out
        assert f"prefix: {cfg.prefix_len} tokens" in out and f"suffix: {cfg.suffix_len} tokens" in out
        assert f"cameras: {', '.join(cfg.cameras)}" in out
        total = sum(p.numel() for p in model.parameters()) / 1e6
        assert f"parameters: {total:,.2f}M" in out
    assert "state: 4 dims, stats mean/std/q01/q99" in describe(tmp_path / "ours")
    mode = "MEAN_STD (mean/std)" if cfg.variant == "pi0" else "QUANTILES (q01/q99)"
    assert f"normalization: state {mode}, actions {mode} (the {cfg.variant} default)" in describe(tmp_path / "ours")
    assert "none found" in describe(tmp_path / "ref")


def test_info_bad_path_is_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["info", str(tmp_path / "missing")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvreuse: error: checkpoint") and "\n" not in err


# ---- broken checkpoints: one ValueError naming the file, from every reader ----------------------


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Pi0Model(preset("tiny-pi0")).eval()


def all_readers_fail(path, match, capsys):
    """load_checkpoint, describe, check_checkpoint and `kvreuse info` all give the one error."""
    for read in (load_checkpoint, describe, check_checkpoint):
        with pytest.raises(ValueError, match=match):
            read(path)
    with pytest.raises(SystemExit):
        cli_main(["info", str(path)])
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvreuse: error: ") and "\n" not in err and "Traceback" not in err
    assert re.search(match, err)


@pytest.mark.parametrize("damage", ["truncated", "header only", "garbage"])
def test_unreadable_weights_name_the_file(tiny, tmp_path, capsys, damage):
    ck = save_checkpoint(tmp_path / "ck", tiny, stats(), "metaworld")
    f = ck / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "header only": data[:100], "garbage": b"\xff" * 64}[damage])
    all_readers_fail(ck, re.escape(f"checkpoint {f}: not a readable safetensors file"), capsys)
    # a reference file too
    save_reference(tmp_path / "ref", tiny)
    ref = tmp_path / "ref" / "model.safetensors"
    ref.write_bytes(ref.read_bytes()[:100])
    all_readers_fail(tmp_path / "ref", re.escape(f"checkpoint {ref}: not a readable safetensors file"), capsys)


def test_weights_truncated_while_loading_name_the_file(tiny, tmp_path, monkeypatch):
    """Past the header check (a file still being copied): the tensor read's error is named too."""
    import kvreuse.checkpoint as ckpt
    import kvreuse.ref_checkpoint as refck

    def truncating(check):
        def wrapped(ref_or_file, *a):
            out = check(ref_or_file, *a)
            f = getattr(ref_or_file, "path", ref_or_file)
            f.write_bytes(f.read_bytes()[:-100])
            return out
        return wrapped

    ck = save_checkpoint(tmp_path / "ck", tiny, None, "metaworld")
    monkeypatch.setattr(ckpt, "check_weights", truncating(ckpt.check_weights))
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {ck / 'model.safetensors'}: not a readable")):
        load_checkpoint(ck)
    ref = save_reference(tmp_path / "ref", tiny)
    monkeypatch.setattr(refck, "match_keys", truncating(refck.match_keys))
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {ref}: not a readable")):
        load_checkpoint(ref)


@pytest.mark.parametrize("name", ["config.json", "norm_stats.json"])
def test_invalid_json_names_the_file(tiny, tmp_path, capsys, name):
    ck = save_checkpoint(tmp_path / "ck", tiny, stats(), "metaworld")
    (ck / name).write_text('{"a": 1\n"b": 2}')
    all_readers_fail(ck, re.escape(f"checkpoint {ck / name}: not valid JSON (Expecting ','"), capsys)


@pytest.mark.parametrize("text", [json.dumps({"state": stats().state.to_dict()}), "null", "[]",
                                  json.dumps({"state": None, "actions": None})])
def test_malformed_norm_stats_name_the_file(tiny, tmp_path, capsys, text):
    ck = save_checkpoint(tmp_path / "ck", tiny, stats(), "metaworld")
    (ck / "norm_stats.json").write_text(text)  # null / a list used to end in an AttributeError traceback
    all_readers_fail(ck, re.escape(f"checkpoint {ck / 'norm_stats.json'}: expected \"state\" and \"actions\""), capsys)


def test_broken_files_beside_reference_weights_are_named(tiny, tmp_path):
    ref = save_reference(tmp_path, tiny, "openpi")
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {tmp_path / 'config.json'}: not valid JSON")):
        load_checkpoint(ref)  # the file given directly: its config.json is not silently dropped
    (tmp_path / "config.json").unlink()
    (tmp_path / "norm_stats.json").write_text("{oops")
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {tmp_path / 'norm_stats.json'}: not valid JSON")):
        load_checkpoint(tmp_path)
    (tmp_path / "norm_stats.json").write_text(json.dumps({"state": {"mean": "abc", "std": [1]}, "actions": []}))
    with pytest.raises(ValueError, match=r"norm stats .*norm_stats\.json \[state\]: expected arrays of numbers"):
        load_checkpoint(tmp_path)
    (tmp_path / "norm_stats.json").unlink()
    proc = tmp_path / "policy_preprocessor_step_5_normalizer_processor.safetensors"
    proc.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=re.escape(f"norm stats {proc}: not a readable safetensors file")):
        load_checkpoint(tmp_path)


def test_own_weights_file_is_recognized(tiny, tmp_path, capsys):
    ck = save_checkpoint(tmp_path / "ck", tiny, None, "metaworld")
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes())
    f = ck / "model.safetensors"
    all_readers_fail(f, re.escape(f"checkpoint {f}: this is a kvreuse weights file; pass its checkpoint directory "
                                  "(with config.json)"), capsys)
    # the folder was given: what it lacks is its config.json (it was told to pass the folder it passed)
    all_readers_fail(tmp_path / "only", re.escape(f"checkpoint {tmp_path / 'only'}: a kvreuse weights file without "
                                                  "its config.json beside it"), capsys)


@pytest.mark.parametrize("meta", [{}, {"robot": "metaworld"}])
def test_config_without_model_section(tiny, tmp_path, capsys, meta):
    ck = save_checkpoint(tmp_path / "ck", tiny, None, "metaworld")
    (ck / "config.json").write_text(json.dumps(meta))
    all_readers_fail(ck, re.escape(f"checkpoint {ck / 'config.json'}: no \"model\" section"), capsys)
    # beside reference weights the same config.json is lerobot's business: it still loads
    save_reference(tmp_path / "ref", tiny)
    (tmp_path / "ref" / "config.json").write_text("{}")
    assert checkpoint_format(tmp_path / "ref") == "reference"
    check_checkpoint(tmp_path / "ref")


@pytest.mark.parametrize("field,value,expected", [
    ("vision.width", "abc", "an integer >= 1"),
    ("chunk_size", 1.5, "an integer >= 1"),
    ("num_steps", True, "an integer >= 1"),
    ("rope_base", "1e4", "a number"),
    ("cameras", "base", "a list of names"),
    ("variant", "pi1", "one of pi0, pi05"),
    ("llm", [], "an object"),
])
def test_config_types_are_checked(tiny, tmp_path, capsys, field, value, expected):
    ck = save_checkpoint(tmp_path / "ck", tiny, None, "metaworld")
    meta = json.loads((ck / "config.json").read_text())
    d = meta["model"]
    *outer, last = field.split(".")
    for k in outer:
        d = d[k]
    d[last] = value
    (ck / "config.json").write_text(json.dumps(meta))
    all_readers_fail(ck, re.escape(f"checkpoint {ck / 'config.json'}: model.{field}: expected {expected}"), capsys)


def test_model_config_from_dict_round_trips_and_checks():
    for cfg in (preset("tiny-pi0"), preset("pi05")):
        assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg
    assert ModelConfig.from_dict({"rope_base": 10000}).rope_base == 10000.0  # ints are numbers
    with pytest.raises(ValueError, match=r"model: unknown field\(s\) \['widht'\]"):
        ModelConfig.from_dict({"widht": 3})
    with pytest.raises(ValueError, match=r"model\.expert\.depth: expected an integer >= 1, got 0"):
        ModelConfig.from_dict({"expert": {"depth": 0}})


@pytest.mark.parametrize("change,first", [
    ({"variant": "pi05"}, "missing keys"),  # a Pi0.5 config over Pi0 weights
    ({"vocab_size": 300}, "wrong shape llm.embed.weight: file (260, 128) vs config (300, 128)"),
])
def test_config_must_fit_the_weights(tiny, tmp_path, capsys, change, first):
    ck = save_checkpoint(tmp_path / "ck", tiny, None, "metaworld")
    meta = json.loads((ck / "config.json").read_text())
    meta["model"].update(change)
    (ck / "config.json").write_text(json.dumps(meta))
    all_readers_fail(ck, re.escape(f"checkpoint {ck / 'model.safetensors'} does not fit its config.json") + ".*"
                     + re.escape(first), capsys)


def test_check_checkpoint_accepts_good_ones_and_reads_no_pickle(tiny, tmp_path):
    check_checkpoint(save_checkpoint(tmp_path / "ck", tiny, stats(), "metaworld"))
    check_checkpoint(save_reference(tmp_path / "ref", tiny))
    (tmp_path / "ck" / "model.safetensors").rename(tmp_path / "ck" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {tmp_path / 'ck'}: no model.safetensors")):
        check_checkpoint(tmp_path / "ck")



def test_load_norm_stats_reads_ours_and_refuses_none(tmp_path):
    from kvreuse.assets import default_checkpoint
    from kvreuse.checkpoint import load_norm_stats, read_stats, save_checkpoint
    from kvreuse.model import Pi0Model, preset

    ck = default_checkpoint("pi05")
    assert np.array_equal(load_norm_stats(ck).actions.q01, read_stats(ck).actions.q01)
    bare = save_checkpoint(tmp_path / "bare", Pi0Model(preset("tiny-pi0")), None, robot="metaworld")
    with pytest.raises(ValueError, match="has no norm stats"):
        load_norm_stats(bare)


# ---- values the checks above let through once --------------------------------------------------


@pytest.mark.parametrize("bad,got", [("null", "non-finite values"), ("nan", "non-finite values"),
                                     ("scalar", "shape ()"), ("empty", "shape (0,)")])
def test_stats_a_mode_applies_must_be_finite_arrays(tiny, tmp_path, capsys, bad, got):
    """A null or NaN inside a list passed every check (the first call blamed the observation); a scalar
    or empty one crashed `kvreuse info` with a traceback."""
    ck = save_checkpoint(tmp_path / "ck", tiny, stats(), "metaworld")
    d = json.loads((ck / "norm_stats.json").read_text())
    d["state"]["mean"] = {"null": [0.1, None, 0.2, 0.3], "nan": [0.1, float("nan"), 0.2, 0.3],
                          "scalar": 0.5, "empty": []}[bad]
    (ck / "norm_stats.json").write_text(json.dumps(d))
    all_readers_fail(ck, re.escape(f"checkpoint {ck / 'norm_stats.json'}: state.mean (meanstd): expected a "
                                   f"non-empty list of finite numbers, got {got}"), capsys)
    d["state"]["mean"] = [0.0] * 4
    d["state"]["q01"] = [None] * 4  # a stat the Pi0's mode does not apply may be unset
    (ck / "norm_stats.json").write_text(json.dumps(d))
    assert load_checkpoint(ck)[1].state.q01.shape == (4,)


def test_reference_stats_must_be_finite_and_agree_with_the_modes(tmp_path):
    torch.manual_seed(0)
    save_reference(tmp_path, Pi0Model(preset("tiny-pi05")).eval(), "openpi")
    st = stats().to_dict()
    st["actions"]["q99"][2] = float("nan")
    (tmp_path / "norm_stats.json").write_text(json.dumps({"norm_stats": st}))
    with pytest.raises(ValueError, match=r"norm_stats\.json \[actions\]: q99 \(quantile\): expected a non-empty list "
                                         r"of finite numbers, got non-finite values"):
        load_checkpoint(tmp_path)
    # kvreuse's own layout beside reference weights: its modes were ignored without a word
    (tmp_path / "norm_stats.json").write_text(json.dumps({**stats().to_dict(), "state_mode": "meanstd"}))
    with pytest.raises(ValueError, match=r"says state_mode 'meanstd', but these weights run state quantile"):
        load_checkpoint(tmp_path)
    (tmp_path / "norm_stats.json").write_text(json.dumps({**stats().to_dict(), "state_mode": "quantile"}))
    assert load_checkpoint(tmp_path)[1].modes("pi05") == ("quantile", "quantile")


def test_lerobot_actions_come_from_the_postprocessor(tmp_path):
    """lerobot unnormalizes actions with its postprocessor's stats: the preprocessor's used to win."""
    torch.manual_seed(0)
    save_reference(tmp_path, Pi0Model(preset("tiny-pi0")).eval(), "lerobot")
    st, post = stats(), stats(seed=1)
    _lerobot_stats(tmp_path, st.state, st.actions)
    save_file({f"action.{k}": torch.tensor(getattr(post.actions, k), dtype=torch.float32) for k in ("mean", "std")},
              str(tmp_path / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    loaded = load_checkpoint(tmp_path)[1]
    np.testing.assert_allclose(loaded.actions.mean, post.actions.mean, rtol=1e-6)
    np.testing.assert_allclose(loaded.state.mean, st.state.mean, rtol=1e-6)


def test_weights_of_a_non_float_dtype_are_refused(tiny, tmp_path, capsys):
    """int8 / bool / fp8 tensors were cast to float and loaded (fp8 without its scales: garbage)."""
    ck = save_checkpoint(tmp_path / "ck", tiny, stats(), "metaworld")
    sd = load_file(str(ck / "model.safetensors"))
    sd["projector.weight"] = sd["projector.weight"].to(torch.int8)
    save_file(sd, str(ck / "model.safetensors"))
    all_readers_fail(ck, re.escape(f"checkpoint {ck / 'model.safetensors'}: 1 tensor(s) of a non-float dtype "
                                   "(projector.weight I8)"), capsys)
    ref = save_reference(tmp_path / "ref", tiny, "lerobot")
    sd = load_file(str(ref))
    key = next(k for k in sd if k.endswith("multi_modal_projector.linear.weight"))
    sd[key] = sd[key].to(torch.float8_e4m3fn)
    sd["model.paligemma_with_expert.paligemma.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(4)
    save_file(sd, str(ref))
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {ref}: 1 tensor(s) of a non-float dtype ({key} "
                                                   "F8_E4M3)")):  # the int position_ids are no weight: not named
        load_checkpoint(ref.parent)


def test_a_config_json_that_is_no_object_is_refused_for_the_weights_file_too(tiny, tmp_path):
    ref = save_reference(tmp_path, tiny, "lerobot")
    (tmp_path / "config.json").write_text("[1, 2]")
    for given in (tmp_path, ref):  # given the file, it was dropped and defaults ran
        with pytest.raises(ValueError, match=re.escape(f"checkpoint {tmp_path / 'config.json'}: expected a JSON "
                                                       "object, got list")):
            load_checkpoint(given)
