"""Model code: single-device, never imports torch.distributed (parallelism is applied from outside)."""

from .layers import MLP, Attention, Block, Linear, RMSNorm, RotaryEmbedding, apply_rope, attention_reference
from .mod import MoDBlock
from .routers import (
    ROUTER_CLASSES,
    ExpertChoiceRouter,
    Predictor,
    RandomRouter,
    Router,
    TokenChoiceRouter,
    make_router,
    register_router,
    router_class,
)
from .transformer import ModelOutput, MoDTransformer

__all__ = [
    "MLP", "Attention", "Block", "ExpertChoiceRouter", "Linear", "MoDBlock", "MoDTransformer", "ModelOutput",
    "Predictor", "RMSNorm", "ROUTER_CLASSES", "RandomRouter", "RotaryEmbedding", "Router", "TokenChoiceRouter",
    "apply_rope", "attention_reference", "make_router", "register_router", "router_class",
]
