"""Shared fixtures: a clean, seeded, fp32 world for every test, and a tiny-config factory."""

from __future__ import annotations

import os

import pytest
import torch

from mixdepth.config import ModelConfig

# One intra-op thread: the test models are tiny, and on a small shared machine (2 cores, other jobs
# running) OpenMP threads spin against each other; measured here, tests/test_mod.py + test_kvcache.py
# took 56 s with the default threads under load and 3.8 s with one. MIXDEPTH_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("MIXDEPTH_TEST_THREADS", "1")))
# Nothing in the tests may reach a model or data hub (transformers, datasets, lm-eval read these at import)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _clean_torch_state():
    """Seed torch, keep fp32 as the default dtype and TF32 off, and restore all three afterwards.

    A test that changes the default dtype (e.g. to check bf16 paths) must not leak it into the
    next test, whose tolerances assume fp32.
    """
    dtype = torch.get_default_dtype()
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)
    torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    torch.backends.cudnn.allow_tf32 = cudnn_tf32


@pytest.fixture
def debug_cfg():
    """Factory: `debug_cfg(**overrides)` builds the `debug` preset with model and routing overrides.

    Routing fields may be given flat (`capacity=0.5`) or as `routing=dict(...)`; a flat name that is
    a routing field goes to the routing config, everything else to the model config.
    """
    from mixdepth.config import RoutingConfig

    routing_fields = set(RoutingConfig.__dataclass_fields__)

    def make(**overrides) -> ModelConfig:
        routing = dict(overrides.pop("routing", {}) or {})
        for name in list(overrides):
            if name in routing_fields:
                routing[name] = overrides.pop(name)
        return ModelConfig.from_name("debug", routing=routing, **overrides)

    return make


def greedy_by_full_forward(model, prompt: list[int], n: int, mode: str = "causal") -> list[int]:
    """Greedy tokens from repeated full forward passes (no cache) in `mode`: the reference that
    cached generation is compared with."""
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(ids, mode=mode).logits[0, -1].argmax())
            out.append(t)
            ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    return out


def generate_cli(capsys, *argv) -> tuple[int, str, str]:
    """Run `mixdepth generate ARGV` in-process: (exit code, stdout, stderr)."""
    from mixdepth.cli import main

    try:
        code = main(["generate", *map(str, argv)])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- a tiny text corpus ---------------------------------------------------------------------------
SENTENCES = [
    "The quality of mercy is not strained; it droppeth as the gentle rain from heaven upon the place beneath.",
    "All the world's a stage, and all the men and women merely players.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "If music be the food of love, play on; give me excess of it.",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
    "What's in a name? That which we call a rose by any other name would smell as sweet.",
]


@pytest.fixture
def corpus(tmp_path):
    """~10 KB of English lines in a varying order, enough for train and validation windows of 64."""
    lines = [f"{i}. {SENTENCES[(i * 5) % len(SENTENCES)]}" for i in range(100)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path
