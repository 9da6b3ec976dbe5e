"""Observation streams: what a policy saw, step by step, recorded once and replayed to compare
settings on identical inputs.

File format (one `.safetensors` file; nothing is ever unpickled):

    tensors   "{step:06d}/{key}" -> the array of raw observation entry `key` at that step,
              dtype and shape as recorded (e.g. "000003/observation/image" uint8 (H, W, 3))
    metadata  "kvreuse_stream" -> JSON:
              {"format": "kvreuse-stream", "version": 1, "robot": "metaworld", "meta": {...},
               "steps": [{"reset": true, "prompt": "..." or null, "arrays": ["observation/image", ...],
                          "extra": {non-array JSON values}}, ...]}

`reset` marks the first step of an episode (the policy is reset before it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..outputs import usual_mode

FORMAT, VERSION = "kvreuse-stream", 1


@dataclass
class StreamStep:
    raw: dict  # openpi-style observation dict (arrays + "prompt")
    reset: bool = False
    seed: int | None = None  # an episode's first step, recorded by `kvreuse eval --streams`: its noise seed


@dataclass
class ObservationStream:
    steps: list[StreamStep] = field(default_factory=list)
    robot: str = "metaworld"
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[StreamStep]:
        return iter(self.steps)

    def add(self, raw: dict, reset: bool = False, seed: int | None = None) -> None:
        """Record one observation (copied, so later mutation by the env does not leak in); seed: the
        noise seed of the episode it starts."""
        self.steps.append(StreamStep({k: (np.array(v) if _is_array(v) else v) for k, v in raw.items()}, reset, seed))

    def where(self, i: int) -> str:
        """Step `i` in words for an error: its file and step there for a folder's streams."""
        meta = self.meta if isinstance(self.meta, dict) else {}  # as loaded: any JSON
        files, counts, j = meta.get("files"), meta.get("file_steps"), i
        if isinstance(files, list) and isinstance(counts, list) and len(files) == len(counts):
            for name, n in zip(files, counts, strict=True):
                if j < n:
                    return f"step {i} ({name} step {j})"
                j -= n
        return f"step {i}"

    @property
    def episodes(self) -> int:
        return sum(s.reset for s in self.steps)

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        path = Path(path)
        tensors, index = {}, []
        for i, st in enumerate(self.steps):
            arrays, extra = [], {}
            for k, v in st.raw.items():
                if k == "prompt":
                    continue
                if _is_array(v):
                    tensors[f"{i:06d}/{k}"] = np.ascontiguousarray(np.asarray(v))
                    arrays.append(k)
                else:
                    extra[k] = v
            # null when the observation had no prompt (a policy's default prompt answered it):
            # replayed without one too, so the default answers again
            index.append({"reset": bool(st.reset), "prompt": st.raw.get("prompt"), "arrays": arrays, "extra": extra,
                          **({"seed": st.seed} if st.seed is not None else {})})  # a folder's episodes keep theirs
        header = {"format": FORMAT, "version": VERSION, "robot": self.robot, "meta": self.meta, "steps": index}
        try:
            text = json.dumps(header)
        except TypeError as e:  # a non-array value that JSON cannot hold (an object, a set, ...)
            raise ValueError(f"stream {path}: an observation value is neither an array nor JSON ({e})") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}.part")  # renamed when whole: a killed run leaves no torn stream
        try:
            save_file(tensors, str(part), metadata={"kvreuse_stream": text})
            usual_mode(part)
            os.replace(part, path)
        finally:
            part.unlink(missing_ok=True)
        return path

    @staticmethod
    def load(path: str | Path) -> "ObservationStream":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"stream {path}: no such file (expected a .safetensors observation stream)")
        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                if "kvreuse_stream" not in meta:
                    raise ValueError(f"stream {path}: no 'kvreuse_stream' metadata (not a kvreuse observation stream)")
                header = json.loads(meta["kvreuse_stream"])
                if header.get("format") != FORMAT or header.get("version") != VERSION:
                    raise ValueError(
                        f"stream {path}: format {header.get('format')!r} version {header.get('version')!r}; "
                        f"expected {FORMAT!r} version {VERSION}"
                    )
                steps = []
                for i, st in enumerate(header["steps"]):
                    raw = {k: f.get_tensor(f"{i:06d}/{k}") for k in st["arrays"]}
                    raw.update(st.get("extra", {}))
                    if st["prompt"] is not None:
                        raw["prompt"] = st["prompt"]
                    seed = st.get("seed")
                    if seed is not None and type(seed) is not int:
                        raise TypeError(f"step {i}: seed {seed!r} is not an integer")
                    steps.append(StreamStep(raw, bool(st["reset"]), seed))
        except (OSError, json.JSONDecodeError, KeyError, SafetensorError) as e:
            raise ValueError(f"stream {path}: unreadable ({e})") from None
        except (TypeError, AttributeError) as e:  # JSON, but not shaped as FORMAT's header (another tool's)
            raise ValueError(f"stream {path}: unreadable (malformed 'kvreuse_stream' metadata: {e})") from None
        robot = header.get("robot", "metaworld")
        if not isinstance(robot, str):
            raise ValueError(f"stream {path}: unreadable (robot {robot!r} is not a name)")
        meta = header.get("meta", {})
        # One eval episode per file: the live run drew its noise from a generator seeded with the
        # episode's seed, so a replay does too (the phase gate reads the predicted chunk).
        if (isinstance(meta, dict) and "setting" in meta and type(meta.get("seed")) is int and steps
                and sum(st.reset for st in steps) <= 1 and steps[0].seed is None):
            steps[0].seed = meta["seed"]
        return ObservationStream(steps, robot, meta)


def load_streams(path: str | Path) -> ObservationStream:
    """A stream file, or every `*.safetensors` stream under a folder (recursively, in path order)
    as one stream: each file's episodes keep their resets; all must be for one robot."""
    path = Path(path)
    if not path.is_dir():
        return ObservationStream.load(path)
    files = sorted(path.rglob("*.safetensors"))
    if not files:
        raise ValueError(f"stream {path}: a folder with no .safetensors observation streams")
    parts = [ObservationStream.load(f) for f in files]
    robots = {p.robot for p in parts}
    if len(robots) > 1:
        raise ValueError(f"stream {path}: streams for several robots ({', '.join(sorted(robots))}); replay one robot's")
    # `kvreuse eval --streams` names the setting it recorded: a folder above several is told apart
    settings = sorted({p.meta["setting"] for p in parts
                       if isinstance(p.meta, dict) and isinstance(p.meta.get("setting"), str)})
    policies = sorted({p.meta["policy"] for p in parts
                       if isinstance(p.meta, dict) and isinstance(p.meta.get("policy"), str)})
    out = ObservationStream(robot=parts[0].robot, meta={"files": [str(f.relative_to(path)) for f in files],
                                                        "file_steps": [len(p) for p in parts], "settings": settings,
                                                        "policies": policies})
    for p in parts:
        if p.steps:
            p.steps[0].reset = True  # a file starts an episode whatever it recorded
        out.steps.extend(p.steps)
    return out


def _is_array(v) -> bool:
    return isinstance(v, np.ndarray) or (hasattr(v, "__array__") and not isinstance(v, (str, bytes)))


# ---- a synthetic stream for tiny random models -----------------------------------------------


def synthetic_stream(
    steps: int = 40,
    episodes: int = 2,
    size: int = 128,
    seed: int = 0,
    camera_keys: tuple[str, ...] = ("observation/image", "observation/wrist_image"),
    state_dim: int = 4,
    robot: str = "metaworld",
) -> ObservationStream:
    """A scene with a slowly moving block, pauses (identical frames), a gripper that closes
    mid-episode and camera sensor noise: gives every gate something to decide. `steps` per
    episode; each episode has its own prompt."""
    rng = np.random.default_rng(seed)
    prompts = ["pick up the red block", "push the block to the goal", "open the drawer", "press the button"]
    out = ObservationStream(robot=robot, meta={"synthetic": True, "seed": seed, "steps": steps, "episodes": episodes})
    yy, xx = np.mgrid[0:size, 0:size]
    for ep in range(episodes):
        bg = (40 + 60 * (xx / size)[..., None] * rng.uniform(0.5, 1.0, 3) + 40 * (yy / size)[..., None]).astype(np.float64)
        start = rng.uniform(0.2, 0.4, 2) * size
        goal = rng.uniform(0.6, 0.8, 2) * size
        pos = start.copy()
        for t in range(steps):
            moving = (t // 5) % 3 != 2  # every third block of 5 steps the scene holds still
            if moving:
                pos = pos + (goal - start) / steps * 1.5
            grip = 1.0 if t < steps // 2 else -1.0
            raw = {}
            for ci, key in enumerate(camera_keys):
                img = bg.copy()
                c = pos if ci == 0 else pos * 0.5 + size * 0.25  # the wrist view sees it closer
                r = size // 10 if ci == 0 else size // 5
                y0, x0 = int(c[0]) - r, int(c[1]) - r
                img[max(y0, 0) : y0 + 2 * r, max(x0, 0) : x0 + 2 * r] = (200, 40, 40)
                if moving:
                    img = img + rng.normal(0, 2.0, img.shape)
                raw[key] = np.clip(img, 0, 255).astype(np.uint8)
            state = np.zeros(state_dim)
            state[: min(2, state_dim)] = (pos / size)[: min(2, state_dim)]
            state[-1] = grip
            raw["observation/state"] = state
            raw["prompt"] = prompts[ep % len(prompts)]
            out.add(raw, reset=t == 0)
    return out
