from .config import GemmaConfig, ModelConfig, PRESETS, VisionConfig, preset
from .pi0 import Pi0Model, param_count

__all__ = ["GemmaConfig", "ModelConfig", "PRESETS", "VisionConfig", "preset", "Pi0Model", "param_count"]
