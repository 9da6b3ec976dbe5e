"""Reference Pi0 / Pi0.5 checkpoints: lerobot and openpi-converted `model.safetensors`.

Key layout (lerobot 0.6, transformers 5): an optional top-level `model.`, then
`paligemma_with_expert.paligemma.model.{vision_tower.vision_model, multi_modal_projector.linear,
language_model}.*`, `paligemma_with_expert.gemma_expert.model.*` and the heads. openpi-converted
files lack `model.`, may name Pi0's time MLP `time_mlp_*`, and older transformers put the
language model at `paligemma.language_model.model.*` (and vision/projector without `.model`).
The embedding is tied to `paligemma.lm_head.weight`: files may store only the latter. The action
expert's `lm_head` is never used and is ignored.

The variant is read from the keys (Pi0.5: expert norms have `.dense.weight`; Pi0: `state_proj`).
Shapes are read lazily (`safe_open`), the model is built on the meta device and the tensors are
loaded straight onto the target device, so full-size files never pass through a CPU model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .model.config import ModelConfig, preset
from .model.pi0 import Pi0Model
from .transforms.normalize import LEROBOT_NAMES, NEEDS, NormMode, NormStats, Stats, default_mode

WEIGHTS = "model.safetensors"

_PG = "paligemma_with_expert.paligemma."
_VISION = _PG + "model.vision_tower.vision_model."
_PROJ = _PG + "model.multi_modal_projector.linear."
_LLM = _PG + "model.language_model."
_EXPERT = "paligemma_with_expert.gemma_expert.model."
_LM_HEAD = _PG + "lm_head.weight"
_EXPERT_LM_HEAD = "paligemma_with_expert.gemma_expert.lm_head.weight"

# Older transformers layouts -> the transformers-5 one.
_LEGACY = (
    (_PG + "language_model.model.", _LLM),
    (_PG + "language_model.lm_head.", _PG + "lm_head."),
    (_PG + "vision_tower.", _PG + "model.vision_tower."),
    (_PG + "multi_modal_projector.", _PG + "model.multi_modal_projector."),
)

_SIGLIP = {
    "layer_norm1": "ln1", "layer_norm2": "ln2", "self_attn.q_proj": "q", "self_attn.k_proj": "k",
    "self_attn.v_proj": "v", "self_attn.out_proj": "o", "mlp.fc1": "fc1", "mlp.fc2": "fc2",
}
_GEMMA = {
    "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
    "input_layernorm": "in_norm", "post_attention_layernorm": "post_norm",
}
_HEADS = ("action_in_proj", "action_out_proj", "state_proj", "action_time_mlp_in", "action_time_mlp_out",
          "time_mlp_in", "time_mlp_out")
_LEAF = r"(weight|bias|dense\.weight|dense\.bias)"


def _alt(d: dict[str, str]) -> str:
    return "|".join(re.escape(k) for k in d)


def canonical(key: str) -> str:
    """A file key without `model.` and in the transformers-5 layout."""
    key = key.removeprefix("model.")
    for old, new in _LEGACY:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def to_ours(key: str, variant: str) -> str | None:
    """Canonical reference key -> our parameter name (None: not a parameter we know)."""
    e = re.escape
    m = re.fullmatch(e(_VISION) + r"embeddings\.patch_embedding\.(weight|bias)", key)
    if m:
        return f"vision.patch_embed.{m[1]}"
    if key == _VISION + "embeddings.position_embedding.weight":
        return "vision.pos_embed.weight"
    m = re.fullmatch(e(_VISION) + rf"encoder\.layers\.(\d+)\.({_alt(_SIGLIP)})\.(weight|bias)", key)
    if m:
        return f"vision.layers.{m[1]}.{_SIGLIP[m[2]]}.{m[3]}"
    m = re.fullmatch(e(_VISION) + r"post_layernorm\.(weight|bias)", key)
    if m:
        return f"vision.post_ln.{m[1]}"
    m = re.fullmatch(e(_PROJ) + r"(weight|bias)", key)
    if m:
        return f"projector.{m[1]}"
    if key == _LLM + "embed_tokens.weight":
        return "llm.embed.weight"
    for prefix, ours in ((_LLM, "llm"), (_EXPERT, "expert")):
        m = re.fullmatch(e(prefix) + rf"layers\.(\d+)\.({_alt(_GEMMA)})\.{_LEAF}", key)
        if m:
            return f"{ours}.layers.{m[1]}.{_GEMMA[m[2]]}.{m[3]}"
        m = re.fullmatch(e(prefix) + rf"norm\.{_LEAF}", key)
        if m:
            return f"{ours}.norm.{m[1]}"
    m = re.fullmatch(rf"({'|'.join(_HEADS)})\.(weight|bias)", key)
    if m:
        head = m[1]
        if variant == "pi0" and head.startswith("time_mlp_"):  # openpi's name for Pi0's time MLP
            head = "action_" + head
        return f"{head}.{m[2]}"
    return None


def to_reference(name: str) -> str:
    """Our parameter name -> the lerobot key (without `model.`); inverse of `to_ours`."""
    inv_siglip = {v: k for k, v in _SIGLIP.items()}
    inv_gemma = {v: k for k, v in _GEMMA.items()}
    m = re.fullmatch(r"vision\.patch_embed\.(weight|bias)", name)
    if m:
        return f"{_VISION}embeddings.patch_embedding.{m[1]}"
    if name == "vision.pos_embed.weight":
        return _VISION + "embeddings.position_embedding.weight"
    m = re.fullmatch(r"vision\.layers\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m:
        return f"{_VISION}encoder.layers.{m[1]}.{inv_siglip[m[2]]}.{m[3]}"
    m = re.fullmatch(r"vision\.post_ln\.(weight|bias)", name)
    if m:
        return f"{_VISION}post_layernorm.{m[1]}"
    m = re.fullmatch(r"projector\.(weight|bias)", name)
    if m:
        return _PROJ + m[1]
    if name == "llm.embed.weight":
        return _LLM + "embed_tokens.weight"
    for prefix, ours in ((_LLM, "llm"), (_EXPERT, "expert")):
        m = re.fullmatch(rf"{ours}\.layers\.(\d+)\.(\w+)\.{_LEAF}", name)
        if m:
            return f"{prefix}layers.{m[1]}.{inv_gemma[m[2]]}.{m[3]}"
        m = re.fullmatch(rf"{ours}\.norm\.{_LEAF}", name)
        if m:
            return f"{prefix}norm.{m[1]}"
    return name  # the heads keep their names


# lerobot before 0.4 kept its norm stats as buffers in the weights file (later moved to processor
# files): `normalize_inputs.buffer_observation_state.mean`, `unnormalize_outputs.buffer_action.std`, ...
_LEGACY_NORM = re.compile(r"(normalize_inputs|normalize_targets|unnormalize_outputs)\.buffer_(\w+)\.(\w+)")


def _ignored(key: str) -> bool:
    """Keys that are no weights: the expert's lm_head, non-parameter buffers, old lerobot's norm
    stats (read by read_reference_stats)."""
    return key == _EXPERT_LM_HEAD or key.endswith(("position_ids", "inv_freq")) or bool(_LEGACY_NORM.fullmatch(key))


def detect_variant(keys) -> str | None:
    """"pi05" if the expert norms are adaptive (`.dense.weight`), "pi0" if there is a state_proj."""
    ks = [canonical(k) for k in keys]
    ada = any(k.startswith(_EXPERT) and k.endswith("norm.dense.weight") for k in ks)
    state = any(k == "state_proj.weight" for k in ks)
    if ada == state:
        return None
    return "pi05" if ada else "pi0"


def weights_file(path: str | Path) -> Path:
    path = Path(path)
    f = path / WEIGHTS if path.is_dir() else path
    if not f.is_file():
        raise ValueError(f"checkpoint {path}: no {WEIGHTS} (expected a safetensors file or a directory holding one)"
                         + (_found_instead(path) if path.is_dir() else ""))
    if f.suffix != ".safetensors":
        raise ValueError(f"checkpoint {path}: expected a .safetensors file (nothing else is read: no pickles)")
    if re.fullmatch(_SHARD, f.name):  # else it reads as a Pi0 missing the other shards' keys
        raise ValueError(f"checkpoint {f}: one shard of sharded weights; merge the shards into one {WEIGHTS}")
    return f


_SHARD = r".+-\d+-of-\d+\.safetensors"


_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _found_instead(d: Path) -> str:
    """What a directory without model.safetensors holds instead, and what to do about it."""
    try:
        names = sorted(p.name for p in d.iterdir() if p.is_file())
    except OSError:  # unreadable: the error says no model.safetensors, which is true
        return ""
    shards = [n for n in names
              if re.fullmatch(_SHARD, n) or n.endswith(".safetensors.index.json")]
    if shards:
        return f"; it holds sharded weights ({', '.join(shards[:3])}): merge them into one {WEIGHTS}"
    pickles = [n for n in names if n.endswith(_PICKLES)]
    if pickles:
        return (f"; it holds {', '.join(pickles[:3])}: pickle checkpoints are never read (loading one can run "
                f"code); convert it to safetensors ({WEIGHTS})")
    other = [n for n in names if n.endswith(".safetensors") and "_processor" not in n]  # not lerobot's stats
    return f"; pass one of its .safetensors files ({', '.join(other[:3])}) if it is the weights" if other else ""


@dataclass
class RefFile:
    """What a reference safetensors file holds, read without loading tensors."""

    path: Path
    shapes: dict[str, tuple[int, ...]]  # file key -> shape
    dtypes: dict[str, str]
    variant: str | None
    config: dict = field(default_factory=dict)  # lerobot/openpi config.json beside it, if any

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def layout(self) -> str:
        """"lerobot" (keys under `model.`) or "openpi"."""
        return "lerobot" if any(k.startswith("model.") for k in self.shapes) else "openpi"

    @property
    def openpi_libero(self) -> bool:
        """An openpi file with LIBERO's norm stats: what openpi's LIBERO configs leave, whose
        training choices (state input, delta actions, horizon) its converter does not record."""
        return self.layout == "openpi" and (self.dir / _OPENPI_LIBERO_STATS).is_file()


def inspect_reference(path: str | Path) -> RefFile:
    from .checkpoint import check_dtypes, is_own_weights, read_header, read_json

    f = weights_file(path)
    shapes, dtypes = read_header(f)
    if is_own_weights(shapes):  # else it reads as a Pi0 file missing all its keys
        if Path(path).is_dir():  # (the directory was given: what it lacks is the config)
            raise ValueError(f"checkpoint {path}: a kvreuse weights file without its config.json beside it")
        raise ValueError(f"checkpoint {f}: this is a kvreuse weights file; pass its checkpoint directory "
                         "(with config.json)")
    check_dtypes(f, dtypes, skip=lambda k: _ignored(canonical(k)))  # position_ids are ints
    cfg_file = f.parent / "config.json"
    config = read_json(cfg_file) if cfg_file.is_file() else {}
    if not isinstance(config, dict):  # refused the same way whether the folder or its weights were given
        raise ValueError(f"checkpoint {cfg_file}: expected a JSON object, got {type(config).__name__}")
    return RefFile(f, shapes, dtypes, detect_variant(shapes), config)


def config_from_reference(ref: RefFile) -> ModelConfig:
    """The preset of the file's variant whose shapes fit the file (full size first), with what
    the config.json beside it says (lerobot: chunk_size, tokenizer_max_length, cameras, robot
    dims; openpi: action_horizon...). No fit -> the preset that fits best (its mismatch error)."""
    from .model.config import PRESETS

    _check_kind(ref)  # the file itself, once: then each preset's shapes
    if ref.variant is None:
        raise ValueError(
            f"checkpoint {ref.path}: cannot tell Pi0 from Pi0.5 (expected either `state_proj.weight` "
            "or adaptive expert norms `...gemma_expert.model.layers.N.input_layernorm.dense.weight`)"
        )
    names = [ref.variant] + [n for n, p in PRESETS.items() if p.variant == ref.variant and n != ref.variant]
    best: tuple[int, ModelConfig] | None = None
    for name in names:
        cfg = _config_for(ref, name)
        n = _mismatch(ref, cfg)[2]
        if n == 0:
            return cfg
        if best is None or n < best[0]:  # its error names what is wrong, not every key of another size
            best = (n, cfg)
    return best[1]


def _check_kind(ref: RefFile) -> None:
    """Another model's file (SmolVLA shares Pi0's head names), or a config.json whose lerobot
    `type` is the other variant: one error, not a list of hundreds of missing keys (or a silent
    load of weights that disagree with their config)."""
    kind = ref.config.get("type")
    kind = kind if isinstance(kind, str) else None
    mapped = {k: to_ours(canonical(k), ref.variant or "pi0") for k in ref.shapes}
    if not any(o and o.startswith(("vision.", "llm.")) for o in mapped.values()):  # no vision tower, no LM
        others = sorted(k for k, o in mapped.items() if o is None)
        some = ", ".join(others[:3]) or "none"
        said = f"its config.json says type {kind!r}; " if kind and kind not in ("pi0", "pi05") else ""
        n = len(ref.shapes) - len(others)
        what = (f"none of its {len(ref.shapes)} keys is a lerobot / openpi Pi0 parameter" if not n else
                f"only {n} of its {len(ref.shapes)} keys are lerobot / openpi Pi0 parameters, none of the vision "
                "tower or language model")
        raise ValueError(f"checkpoint {ref.path}: not a Pi0 / Pi0.5 checkpoint ({said}{what}; it has {some}"
                         f"{', ...' if len(others) > 3 else ''})")
    if kind is not None and kind not in ("pi0", "pi05"):  # pi0_fast, smolvla with a vision tower, ...
        raise ValueError(f"checkpoint {ref.dir / 'config.json'}: says type {kind!r}; kvreuse runs lerobot's pi0 "
                         "and pi05 (and openpi's Pi0 / Pi0.5) only")
    norm_modes(ref)  # a mode kvreuse cannot apply: refused before anything loads
    if ref.config.get("use_relative_actions"):  # lerobot 0.6.1: the output adds the state back to the actions
        raise ValueError(f"checkpoint {ref.dir / 'config.json'}: use_relative_actions is true; kvreuse runs "
                         "absolute actions only and would return this model's deltas as positions")
    discrete_state_input(ref)  # a bad value: refused here too
    delta_action_mask(ref)
    if kind in ("pi0", "pi05") and ref.variant is not None and kind != ref.variant:
        why = "state_proj, no adaptive expert norms" if ref.variant == "pi0" else "adaptive expert norms, no state_proj"
        raise ValueError(f"checkpoint {ref.dir / 'config.json'}: says type {kind!r} but its weights {ref.path.name} "
                         f"are a {ref.variant} model ({why})")


def norm_modes(ref: RefFile) -> tuple[NormMode, NormMode]:
    """(state mode, actions mode) from lerobot's config.json `normalization_mapping` (its STATE and
    ACTION; the variant's default where it says nothing). lerobot trains a Pi0.5 with MEAN_STD where
    the dataset lacks quantiles, and either side may be set on its own; another mode is refused."""
    default = default_mode(ref.variant or "pi0")
    mapping = ref.config.get("normalization_mapping")
    if mapping is None:
        return default, default
    where = f"checkpoint {ref.dir / 'config.json'}: normalization_mapping"
    if not isinstance(mapping, dict):
        raise ValueError(f"{where}: expected an object such as {{\"STATE\": \"MEAN_STD\", \"ACTION\": "
                         f"\"MEAN_STD\"}}, got {mapping!r}")
    visual = mapping.get("VISUAL")
    if visual is not None and (not isinstance(visual, str) or visual.upper() != "IDENTITY"):
        # lerobot's normalizer would normalize the images too; kvreuse feeds them as openpi does
        raise ValueError(f"{where}: VISUAL {visual!r} is not supported; kvreuse feeds images unnormalized "
                         "(IDENTITY), as lerobot's Pi0 / Pi0.5 configs do")
    modes = []
    for side in ("STATE", "ACTION"):
        v = mapping.get(side)
        mode = _FROM_LEROBOT.get(v.upper()) if isinstance(v, str) else None
        if v is not None and mode is None:
            raise ValueError(f"{where}: {side} {v!r} is not supported; kvreuse normalizes the state and actions "
                             f"with {' or '.join(_FROM_LEROBOT)}")
        modes.append(mode or default)
    return modes[0], modes[1]


_FROM_LEROBOT: dict[str, NormMode] = {name: mode for mode, name in LEROBOT_NAMES.items()}

# openpi's LIBERO configs (pi05_libero, and fine-tunes made from it) keep the state out of a Pi0.5
# (discrete_state_input=False); their norm stats sit under the asset id of LIBERO's data set.
_OPENPI_LIBERO_STATS = "assets/physical-intelligence/libero/norm_stats.json"


def discrete_state_input(ref: RefFile) -> tuple[bool, str | None]:
    """Whether a Pi0.5 writes its state into the prompt, and a note when config.json does not say
    so and the state is kept out. openpi's converter does not record the training config's
    `discrete_state_input`; a config.json that has it wins. Without it: False for an openpi file
    with LIBERO's norm stats (openpi's pi05_libero), else True (openpi's other Pi0.5 configs;
    lerobot's Pi0.5 always writes it)."""
    v = ref.config.get("discrete_state_input")
    if v is not None:
        if not isinstance(v, bool):
            raise ValueError(f"checkpoint {ref.dir / 'config.json'}: discrete_state_input: expected true or "
                             f"false, got {v!r}")
        return v, None
    if ref.variant == "pi05" and ref.openpi_libero:
        return False, (f"note: checkpoint {ref.path}: an openpi Pi0.5 with LIBERO's norm stats "
                       f"({_OPENPI_LIBERO_STATS}) runs without its state, as openpi's pi05_libero config "
                       "trains it (discrete_state_input=False); if it was trained with the state in its "
                       "prompt, add \"discrete_state_input\": true to its config.json")
    return True, None


# openpi's pi0_libero (and its LoRA / FAST variants) trains with extra_delta_transform: the first 6
# actions as offsets from the state (make_bool_mask(6, -1)); pi05_libero does not.
_LIBERO_DELTA_MASK = (True,) * 6 + (False,)


def delta_action_mask(ref: RefFile) -> tuple[tuple[bool, ...], str | None]:
    """Which action dims are offsets from the state, and a note where config.json does not say so.
    A config.json `delta_action_mask` (a list of true / false, openpi's DeltaActions mask; [] for
    none) wins. Without it: LIBERO's mask for an openpi Pi0 with LIBERO's norm stats (openpi's
    pi0_libero, trained with extra_delta_transform), else none."""
    v = ref.config.get("delta_action_mask")
    if v is not None:
        if not isinstance(v, list) or not all(isinstance(x, bool) for x in v):
            raise ValueError(f"checkpoint {ref.dir / 'config.json'}: delta_action_mask: expected a list of true / "
                             f"false (e.g. [true, true, true, true, true, true, false]), got {v!r}")
        return tuple(v), None
    if ref.variant == "pi0" and ref.openpi_libero:
        return _LIBERO_DELTA_MASK, (
            f"note: checkpoint {ref.path}: an openpi Pi0 with LIBERO's norm stats ({_OPENPI_LIBERO_STATS}) gives its "
            "first 6 actions as offsets from the state, as openpi's pi0_libero config trains it "
            "(extra_delta_transform=True); the state is added back to them. If it was trained on LIBERO's "
            "actions as they are, add \"delta_action_mask\": [] to its config.json")
    return (), None


def default_horizon(ref: RefFile) -> tuple[int | None, str | None]:
    """A reference file's action chunk where its config.json gives none (openpi's PyTorch trainer writes
    no config.json), and a note saying so: pi05_libero's 10 for an openpi Pi0.5 with LIBERO's norm
    stats (the config the state heuristic above assumes), else None (the preset's: openpi's default 50
    at full size)."""
    if any(ref.config.get(k) is not None for k in ("action_horizon", "chunk_size")):
        return None, None
    ask = "add \"action_horizon\": N to its config.json if it was trained with another"
    if ref.variant == "pi05" and ref.openpi_libero:
        return 10, (f"note: checkpoint {ref.path}: no action horizon in a config.json beside it; an openpi Pi0.5 "
                    f"with LIBERO's norm stats runs 10 actions per chunk, as openpi's pi05_libero config trains it; "
                    f"{ask}")
    return None, (f"note: checkpoint {ref.path}: no action horizon in a config.json beside it; it runs openpi's "
                  f"default chunk (50 actions at full size); {ask}")


def _config_for(ref: RefFile, preset_name: str) -> ModelConfig:
    c = ref.config
    kw: dict = {}
    pairs = {
        "chunk_size": "chunk_size", "action_horizon": "chunk_size", "tokenizer_max_length": "max_token_len",
        "max_token_len": "max_token_len", "num_inference_steps": "num_steps", "max_state_dim": "max_state_dim",
        "max_action_dim": "max_action_dim", "action_dim": "max_action_dim", "min_period": "time_min_period",
        "max_period": "time_max_period",
    }
    where = f"checkpoint {ref.dir / 'config.json'}"

    def positive(name: str, v, want: type):
        # Checked, not cast: 2.5 inference steps ran as 2, a chunk of 0 or -5 prompt tokens as given.
        # JSON's Infinity and 1e400 parse as inf: int(inf) would raise OverflowError, an inf period is no period
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
              and (want is float or v == int(v)))
        if not ok:
            what = "a finite number > 0" if want is float else "an integer >= 1"
            raise ValueError(f"{where}: {name}: expected {what}, got {v!r}")
        return want(v)

    base = preset(preset_name)
    for theirs, ours in pairs.items():
        if c.get(theirs) is not None:
            kw[ours] = positive(theirs, c[theirs], type(getattr(base, ours)))
    if (horizon := default_horizon(ref)[0]) is not None:
        kw["chunk_size"] = horizon
    feats, outs = c.get("input_features") or {}, c.get("output_features") or {}
    for name, d in (("input_features", feats), ("output_features", outs)):
        if not isinstance(d, dict) or not all(isinstance(v, dict) for v in d.values()):
            raise ValueError(f"{where}: {name}: expected an object of features (each with type and shape)")
    cams = tuple(k.removeprefix("observation.images.") for k, v in feats.items() if v.get("type") == "VISUAL")
    if cams:
        kw["cameras"] = cams
    for name, feat, ours in (("observation.state", feats.get("observation.state"), "state_dim"),
                             ("action", outs.get("action"), "action_dim")):
        shape = (feat or {}).get("shape")
        if shape:
            if not isinstance(shape, list):
                raise ValueError(f"{where}: {name}: shape: expected a list of sizes, got {shape!r}")
            kw[ours] = positive(f"{name} shape", shape[-1], int)
    # Without lerobot's features the robot's dims are unknown: all of the padded ones (robot_runtime
    # narrows them to the robot's), not the matched preset's own (a tiny preset's 4).
    kw.setdefault("state_dim", kw.get("max_state_dim", base.max_state_dim))
    kw.setdefault("action_dim", kw.get("max_action_dim", base.max_action_dim))
    if ref.variant == "pi05":
        kw["discrete_state_input"] = discrete_state_input(ref)[0]
    kw["delta_action_mask"] = delta_action_mask(ref)[0]
    if ref.variant != "pi05" or not kw["discrete_state_input"]:  # a prompt with the state: one style for all
        kw["prompt_style"] = ref.layout
    cfg = preset(preset_name, **kw, state_below_bins="digitize")  # the prompt openpi / lerobot build
    pos = ref.shapes.get(_key_in(ref, "vision.pos_embed.weight") or "", None)
    if pos is not None:  # the image size follows from the number of position embeddings
        grid = round(pos[0] ** 0.5)
        if grid * grid == pos[0] and grid * cfg.vision.patch_size != cfg.vision.image_size:
            cfg = cfg.replace(vision=_replace(cfg.vision, image_size=grid * cfg.vision.patch_size))
    return cfg


def _replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def _key_in(ref: RefFile, ours: str) -> str | None:
    variant = ref.variant or "pi0"
    for k in ref.shapes:
        if to_ours(canonical(k), variant) == ours:
            return k
    return None


def match_keys(ref: RefFile, cfg: ModelConfig) -> dict[str, str]:
    """Map every parameter of a `cfg` model to a file key; any mismatch -> one ValueError that
    lists the variant mismatch, missing, unexpected and wrong-shape keys."""
    source, problems, _ = _mismatch(ref, cfg)
    if problems:
        raise ValueError(f"checkpoint {ref.path} does not fit the {cfg.variant} config: " + "; ".join(problems))
    return source


def _mismatch(ref: RefFile, cfg: ModelConfig) -> tuple[dict[str, str], list[str], int]:
    """(our key -> file key, the problems in words, how many keys are wrong)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Pi0Model(cfg).state_dict().items()}
    problems = []
    if ref.variant is not None and ref.variant != cfg.variant:
        problems.append(f"variant: the file holds a {ref.variant} model, the config asks for {cfg.variant}")
    elif ref.variant is None:
        problems.append("variant: cannot tell Pi0 from Pi0.5 from the keys")
    source: dict[str, str] = {}
    unexpected, lm_head = [], None
    for k in ref.shapes:
        ck = canonical(k)
        if ck == _LM_HEAD:
            lm_head = k
            continue
        if _ignored(ck):
            continue
        ours = to_ours(ck, cfg.variant)
        if ours is None or ours not in expected or ours in source:
            unexpected.append(k)
        else:
            source[ours] = k
    if "llm.embed.weight" not in source and lm_head is not None:
        source["llm.embed.weight"] = lm_head  # tied embedding stored only as lm_head
    missing = [to_reference(k) for k in expected if k not in source]
    wrong = [
        f"{source[k]}: file {ref.shapes[source[k]]} vs model {shape}"
        for k, shape in expected.items()
        if k in source and ref.shapes[source[k]] != shape
    ]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            more = f", ... and {len(items) - 8} more" if len(items) > 8 else ""
            problems.append(f"{label} ({len(items)}): " + ", ".join(items[:8]) + more)
    dims = {k: ref.config[k] for k in ("max_state_dim", "max_action_dim", "action_dim") if k in ref.config}
    if dims and any(h in w for w in wrong for h in ("state_proj", "action_in_proj", "action_out_proj")):
        # these shapes came from the config.json, not from the weights
        problems.append(f"config.json sets {', '.join(f'{k}={v}' for k, v in dims.items())}")
    return source, problems, len(missing) + len(unexpected) + len(wrong) + (ref.variant != cfg.variant)


def load_reference(
    path: str | Path,
    cfg: ModelConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[Pi0Model, NormStats | None, dict]:
    """Load a lerobot / openpi `model.safetensors` (file or directory) -> (model in eval mode,
    norm stats or None, metadata). `cfg` defaults to the full-size preset of the detected variant
    adjusted by the config.json beside the file; tensors are cast to `dtype` (default float32)."""
    from safetensors import SafetensorError, safe_open

    ref = inspect_reference(path)
    cfg = cfg or config_from_reference(ref)
    source = match_keys(ref, cfg)
    dtype = dtype or torch.float32
    with torch.device("meta"):
        model = Pi0Model(cfg)
    state = {}
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    try:
        with safe_open(str(ref.path), framework="pt", device=str(dev)) as f:
            for ours, key in source.items():
                # On the CPU, copy out of the file's memory map: an allocator-aligned tensor runs the
                # same kernels as one built in memory (bit-identical actions to the saved model).
                state[ours] = f.get_tensor(key).to(dtype=dtype, copy=dev.type == "cpu")
    except (OSError, SafetensorError) as e:
        raise ValueError(f"checkpoint {ref.path}: not a readable safetensors file ({e})") from None
    model.load_state_dict(state, strict=True, assign=True)
    stats = read_reference_stats(ref.dir, cfg.variant, norm_modes(ref), ref.path)
    meta = {"model": cfg.to_dict(), "format": ref.layout, "weights": str(ref.path)}
    return model.eval(), stats, meta


# ---- norm stats ---------------------------------------------------------------------------------

_LEROBOT_STATE, _LEROBOT_ACTION = "observation.state", "action"


def _stats_from(d: dict, mode: NormMode, where: str) -> Stats:
    """Stats from {stat name: array}; stats the mode needs must be there, others become NaN."""
    if not isinstance(d, dict):
        raise ValueError(f"norm stats {where}: expected an object of stat arrays, got {type(d).__name__}")  # noqa: TRY004
    needed = NEEDS[mode]
    d = {k: v for k, v in d.items() if v is not None}  # openpi writes an unset (Optional) q01 / q99 as null
    lacking = [k for k in needed if k not in d]
    if lacking:
        raise ValueError(f"norm stats {where}: missing {lacking} for {LEROBOT_NAMES[mode]} (has {sorted(d)})")
    try:
        ref = np.asarray(d[needed[0]], dtype=np.float64).reshape(-1)
        vals = {k: np.asarray(d[k], dtype=np.float64).reshape(-1) if k in d else np.full_like(ref, np.nan)
                for k in ("mean", "std", "q01", "q99")}
    except (TypeError, ValueError) as e:
        raise ValueError(f"norm stats {where}: expected arrays of numbers ({e})") from None
    out = Stats(**vals)
    try:
        out.check(mode)
    except ValueError as e:
        raise ValueError(f"norm stats {where}: {e}") from None
    return out


def read_reference_stats(directory: str | Path, variant: str,
                         modes: tuple[NormMode, NormMode] | None = None,
                         weights: Path | None = None) -> NormStats | None:
    """Norm stats beside reference weights: openpi `norm_stats.json` (also anywhere under `assets/`), or
    lerobot's `policy_preprocessor*_normalizer_processor.safetensors` (keys `observation.state.mean`,
    `action.q01`, ...), with `policy_postprocessor*_unnormalizer_processor.safetensors` as the
    fallback for the actions. modes: (state, actions) as `norm_modes` reads them, default the
    variant's (Pi0 mean/std, Pi0.5 q01/q99); each side needs its mode's stats, and the stats carry
    the modes. Without any of these files, old lerobot's buffers in the `weights` file. None if there
    are none."""
    d = Path(directory)
    st_mode, act_mode = modes or (default_mode(variant),) * 2
    # openpi writes assets/<asset_id>/norm_stats.json, and an asset id may hold a slash
    # (pi0_libero's is "physical-intelligence/libero"), so search the whole assets tree.
    top = d / "norm_stats.json"
    jsons = [top] if top.is_file() else sorted(d.glob("assets/**/norm_stats.json"))
    if len(jsons) > 1:
        raise ValueError(f"norm stats in {d}: several norm_stats.json under assets/ "
                         f"({[str(j) for j in jsons]}); copy the one to use to {top} (it takes precedence)")
    if jsons:
        from .checkpoint import read_json

        raw = read_json(jsons[0])
        raw = raw.get("norm_stats", raw) if isinstance(raw, dict) else raw
        if not isinstance(raw, dict) or "state" not in raw or "actions" not in raw:
            got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"norm stats {jsons[0]}: expected keys 'state' and 'actions', got {got}")
        # kvreuse's own layout names its modes; here the config.json (or the variant) decides them
        said = {k: raw.get(f"{k}_mode") for k, m in (("state", st_mode), ("actions", act_mode))
                if raw.get(f"{k}_mode") not in (None, m)}
        if said:
            raise ValueError(f"norm stats {jsons[0]}: says {', '.join(f'{k}_mode {v!r}' for k, v in said.items())}, "
                             f"but these weights run state {st_mode}, actions {act_mode} (their config.json's "
                             f"normalization_mapping, else the {variant} default); make the two agree")
        return NormStats(_stats_from(raw["state"], st_mode, f"{jsons[0]} [state]"),
                         _stats_from(raw["actions"], act_mode, f"{jsons[0]} [actions]"), st_mode, act_mode)
    pre = sorted(d.glob("policy_preprocessor*normalizer_processor.safetensors"))
    post = sorted(d.glob("policy_postprocessor*unnormalizer_processor.safetensors"))
    if not pre and not post:
        return _legacy_stats(weights, st_mode, act_mode) if weights is not None else None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def read(files: list[Path]) -> dict[str, np.ndarray]:
        flat: dict[str, np.ndarray] = {}
        for f in files:
            try:
                flat.update({k: v.float().numpy() for k, v in load_file(str(f)).items()})
            except (OSError, SafetensorError) as e:
                raise ValueError(f"norm stats {f}: not a readable safetensors file ({e})") from None
        return flat

    flat_pre, flat_post = read(pre), read(post)

    def group(prefix: str) -> dict:
        # The state as the preprocessor normalizes it; the actions as the postprocessor unnormalizes
        # them (what inference applies), each with the other file as the fallback.
        first, second = (flat_post, flat_pre) if prefix == _LEROBOT_ACTION else (flat_pre, flat_post)
        for flat in (first, second):
            out = {k[len(prefix) + 1:]: v for k, v in flat.items() if k.startswith(prefix + ".")
                   and "." not in k[len(prefix) + 1:]}
            if out:
                return out
        return {}

    where = ", ".join(p.name for p in pre + post)
    return NormStats(_stats_from(group(_LEROBOT_STATE), st_mode, f"{where} [{_LEROBOT_STATE}]"),
                     _stats_from(group(_LEROBOT_ACTION), act_mode, f"{where} [{_LEROBOT_ACTION}]"), st_mode, act_mode)


def _legacy_stats(weights: Path, st_mode: NormMode, act_mode: NormMode) -> NormStats | None:
    """Norm stats from old lerobot's buffers in its weights file (`_LEGACY_NORM`); the actions from
    `unnormalize_outputs` (what inference applies), else `normalize_targets`. lerobot filled unset
    buffers with inf: such a stat counts as absent. None if the file has none."""
    from safetensors import safe_open

    groups: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    with safe_open(str(weights), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 (a safe_open handle)
            m = _LEGACY_NORM.fullmatch(k)
            if m:
                v = f.get_tensor(k).float().numpy()
                if np.isfinite(v).all():
                    groups.setdefault((m[1], m[2]), {})[m[3]] = v
    state = groups.get(("normalize_inputs", "observation_state"))
    act_from = "unnormalize_outputs" if ("unnormalize_outputs", "action") in groups else "normalize_targets"
    actions = groups.get((act_from, "action"))
    if state is None and actions is None:
        return None
    where = f"{weights} [old lerobot buffers"
    return NormStats(_stats_from(state or {}, st_mode, f"{where} normalize_inputs.buffer_observation_state]"),
                     _stats_from(actions or {}, act_mode, f"{where} {act_from}.buffer_action]"),
                     st_mode, act_mode)


def check_reference(path: str | Path) -> tuple[RefFile, ModelConfig, dict[str, str], NormStats | None]:
    """Everything about a reference checkpoint but its tensors: (the file's header, the config its
    shapes give, our key -> its key, its norm stats). Raises one ValueError naming a bad file."""
    ref = inspect_reference(path)
    cfg = config_from_reference(ref)
    return ref, cfg, match_keys(ref, cfg), read_reference_stats(ref.dir, cfg.variant, norm_modes(ref), ref.path)


# ---- export (tests, and handing our weights to reference code) ----------------------------------


def reference_state_dict(model: Pi0Model, layout: str = "lerobot", tie: bool = False) -> dict[str, torch.Tensor]:
    """Our weights under reference key names. layout "lerobot": `model.` prefix; "openpi": no
    prefix and Pi0's time MLP as `time_mlp_*`. tie=True stores the embedding only as lm_head."""
    if layout not in ("lerobot", "openpi"):
        raise ValueError(f"layout: expected 'lerobot' or 'openpi', got {layout!r}")
    out = {}
    for name, t in model.state_dict().items():
        key = to_reference(name)
        if name == "llm.embed.weight" and tie:
            key = _LM_HEAD
        if layout == "openpi" and key.startswith("action_time_mlp_"):
            key = key[len("action_"):]
        out[("model." if layout == "lerobot" else "") + key] = t.detach().contiguous().cpu()
    return out


def save_reference(path: str | Path, model: Pi0Model, layout: str = "lerobot", tie: bool = False) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    f = path / WEIGHTS if path.suffix != ".safetensors" else path
    f.parent.mkdir(parents=True, exist_ok=True)
    save_file(reference_state_dict(model, layout, tie), str(f))
    return f
