"""mixdepth: Mixture-of-Depths transformer language models (Raposo et al. 2024, arXiv 2404.02258)."""

from .config import PRESETS, ModelConfig, RoutingConfig
from .hf import from_hf, to_hf
from .hf.register import install as _install_transformers_registration
from .model import ModelOutput, MoDTransformer

__version__ = "0.1.0"

# transformers' Auto classes learn "mixdepth" when transformers loads them (nothing is imported now)
_install_transformers_registration()
__all__ = ["PRESETS", "ModelConfig", "ModelOutput", "MoDTransformer", "RoutingConfig", "__version__", "from_hf",
           "to_hf"]
