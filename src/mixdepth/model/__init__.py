"""Model code: single-device, never imports torch.distributed (parallelism is applied from outside)."""

from .layers import MLP, Attention, Block, Linear, RMSNorm, RotaryEmbedding, apply_rope, attention_reference
from .mod import MoDBlock
from .routers import ExpertChoiceRouter, Predictor, RandomRouter, TokenChoiceRouter
from .transformer import ModelOutput, MoDTransformer

__all__ = [
    "MLP", "Attention", "Block", "ExpertChoiceRouter", "Linear", "MoDBlock", "MoDTransformer", "ModelOutput",
    "Predictor", "RMSNorm", "RandomRouter", "RotaryEmbedding", "TokenChoiceRouter", "apply_rope",
    "attention_reference",
]
