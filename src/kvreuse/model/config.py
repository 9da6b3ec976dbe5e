"""Model configuration: one dataclass for Pi0 and Pi0.5, with named presets.

Every sequence length is derived from these fields (the TurboPi seed's Bug 1 was a
hard-coded prompt length), so nothing else in the package writes a token count.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower."""

    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class GemmaConfig:
    """A Gemma decoder stack (the prefix LM or the action expert)."""

    width: int = 2048
    depth: int = 18
    mlp_dim: int = 16384
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    eps: float = 1e-6


@dataclass(frozen=True)
class ModelConfig:
    """Pi0 (`variant="pi0"`) and Pi0.5 (`variant="pi05"`) as one model.

    Differences between the variants are the two flags below; everything else is shared.
    """

    variant: Literal["pi0", "pi05"] = "pi0"
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: GemmaConfig = field(default_factory=GemmaConfig)
    expert: GemmaConfig = field(
        default_factory=lambda: GemmaConfig(width=1024, depth=18, mlp_dim=4096)
    )
    vocab_size: int = 257152
    max_token_len: int = 48
    chunk_size: int = 50
    max_state_dim: int = 32
    max_action_dim: int = 32
    num_steps: int = 10
    cameras: tuple[str, ...] = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
    # "sentencepiece" needs a tokenizer.model path; "bytes" is built in (tiny presets).
    tokenizer: Literal["sentencepiece", "bytes"] = "sentencepiece"
    rope_base: float = 10000.0
    time_min_period: float = 4e-3
    time_max_period: float = 4.0
    state_bins: int = 256
    # A Pi0.5 state below -1 after normalization: openpi and lerobot write bin -1 (np.digitize - 1,
    # unclipped); the testbed policies were trained with it clipped to bin 0, so they keep that.
    state_below_bins: Literal["clip", "digitize"] = "clip"
    # Pi0.5 only (openpi's Pi0Config field of the same name): False keeps the state out of the
    # model altogether, as openpi's pi05_libero was trained: the prompt is Pi0's, with no state.
    discrete_state_input: bool = True
    # The actual dims of the robot this model drives (state/actions are padded to max_*_dim).
    state_dim: int = 32
    action_dim: int = 32
    # Action dims the model gives as offsets from the state's same dim (openpi's DeltaActions mask,
    # make_bool_mask: pi0_libero's extra_delta_transform is (True,) * 6 + (False,)); the robot
    # transform adds the unnormalized state back, as openpi's AbsoluteActions does. (): absolute.
    delta_action_mask: tuple[bool, ...] = ()
    # How a prompt without the state (Pi0; a Pi0.5 without its state) is tokenized, as the pipeline
    # that trained the model did: "openpi" cleans the task (strip, "_" -> " ") and encodes it and
    # "\n" apart; "lerobot" (Pi0NewLineProcessor) appends "\n" to the task as given and encodes
    # both at once; "kvreuse" (the testbed) cleans and encodes both at once. The byte tokenizer
    # gives one result for openpi and kvreuse; SentencePiece may merge a last piece with "\n".
    prompt_style: Literal["kvreuse", "openpi", "lerobot"] = "kvreuse"

    @property
    def state_in_prompt(self) -> bool:
        """Pi0.5 discretizes the state into the prompt (unless discrete_state_input is False)."""
        return self.variant == "pi05" and self.discrete_state_input

    @property
    def state_token(self) -> bool:
        """Pi0 feeds the state as the suffix's first token; Pi0.5 has no such token."""
        return self.variant == "pi0"

    @property
    def adarms(self) -> bool:
        """Pi0.5 conditions every expert RMSNorm on the flow-matching time."""
        return self.variant == "pi05"

    @property
    def prefix_len(self) -> int:
        return len(self.cameras) * self.vision.num_patches + self.max_token_len

    @property
    def suffix_len(self) -> int:
        return self.chunk_size + (1 if self.state_token else 0)

    def __post_init__(self) -> None:
        if self.llm.depth != self.expert.depth:
            raise ValueError("llm.depth and expert.depth must match (the expert attends layer by layer)")
        if (self.llm.num_kv_heads, self.llm.head_dim) != (self.expert.num_kv_heads, self.expert.head_dim):
            raise ValueError("llm and expert must share the KV geometry (num_kv_heads, head_dim)")
        if self.llm.num_heads != self.expert.num_heads:
            raise ValueError("llm and expert must have the same number of query heads")
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError("vision.image_size must be a multiple of vision.patch_size")
        if not self.cameras:
            raise ValueError("at least one camera is required")

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @staticmethod
    def from_dict(d: dict) -> "ModelConfig":
        """From JSON (a checkpoint's config.json "model"): every field's type is checked, one
        ValueError names the first bad field (e.g. `model.vision.width`). Absent fields default."""
        return _from_dict(ModelConfig, d, "model")


def _from_dict(cls, d, where: str):
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object, got {d!r}")  # noqa: TRY004 (bad input)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; expected some of {names}")
    return cls(**{k: _checked(hints[k], v, f"{where}.{k}") for k, v in d.items()})


def _checked(tp, v, name: str):
    """v as a value of type tp (JSON types: ints for sizes, numbers for floats, lists for tuples)."""
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, v, name)
    if typing.get_origin(tp) is Literal:
        if not isinstance(v, str) or v not in tp.__args__:
            raise ValueError(f"{name}: expected one of {', '.join(tp.__args__)}, got {v!r}")
        return v
    if tp is bool:
        if not isinstance(v, bool):
            raise ValueError(f"{name}: expected true or false, got {v!r}")
        return v
    if tp is int:  # every int field is a size or a count
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        return v
    if tp is float:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"{name}: expected a number, got {v!r}")
        return float(v)
    if typing.get_origin(tp) is tuple and typing.get_args(tp)[0] is bool:  # delta_action_mask
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, bool) for x in v):
            raise ValueError(f"{name}: expected a list of true / false, got {v!r}")
        return tuple(v)
    if typing.get_origin(tp) is tuple:  # tuple[str, ...]: the camera names
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) and x for x in v):
            raise ValueError(f"{name}: expected a list of names (strings), got {v!r}")
        return tuple(v)
    raise TypeError(f"{name}: no JSON check for type {tp}")  # a new field type: add its check


_TINY_VISION = VisionConfig(width=96, depth=3, mlp_dim=256, num_heads=4, patch_size=16, image_size=128)
_TINY_LLM = GemmaConfig(width=128, depth=4, mlp_dim=384, num_heads=4, num_kv_heads=1, head_dim=32)
_TINY_EXPERT = GemmaConfig(width=96, depth=4, mlp_dim=256, num_heads=4, num_kv_heads=1, head_dim=32)

PRESETS: dict[str, ModelConfig] = {
    # Full size, exact reference shapes.
    "pi0": ModelConfig(variant="pi0", max_token_len=48, state_below_bins="digitize"),
    "pi05": ModelConfig(variant="pi05", max_token_len=200, state_below_bins="digitize"),
    # A few million parameters, same code paths; built-in byte tokenizer, two cameras.
    "tiny-pi0": ModelConfig(
        variant="pi0", vision=_TINY_VISION, llm=_TINY_LLM, expert=_TINY_EXPERT, vocab_size=260,
        max_token_len=48, chunk_size=16, num_steps=10, cameras=("base", "wrist"), tokenizer="bytes",
        state_dim=4, action_dim=4,
    ),
    "tiny-pi05": ModelConfig(
        variant="pi05", vision=_TINY_VISION, llm=_TINY_LLM, expert=_TINY_EXPERT, vocab_size=260,
        max_token_len=96, chunk_size=16, num_steps=10, cameras=("base", "wrist"), tokenizer="bytes",
        state_dim=4, action_dim=4,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    return cfg.replace(**overrides) if overrides else cfg
