"""mixdepth: Mixture-of-Depths transformer language models (Raposo et al. 2024, arXiv 2404.02258)."""

from .config import PRESETS, ModelConfig, RoutingConfig
from .hf import from_hf, to_hf
from .model import ModelOutput, MoDTransformer

__version__ = "0.1.0"
__all__ = ["PRESETS", "ModelConfig", "ModelOutput", "MoDTransformer", "RoutingConfig", "__version__", "from_hf",
           "to_hf"]
