"""Scale-out on PyTorch's own distributed stack: torchrun, DDP and FSDP2 (torchtitan's recipe).

The model code is single-device and never imports `torch.distributed`; parallelism is applied from
outside, here, by the trainer:

- `init_from_env()`: under `torchrun` (WORLD_SIZE > 1) the process group starts from the usual
  environment (nccl on CUDA, gloo on CPU), each rank on `cuda:LOCAL_RANK` when on CUDA.
- `apply_ddp(model)`: DistributedDataParallel; the trainer skips the all-reduce on non-final
  micro-steps (`no_sync`).
- `apply_fsdp(model)`: FSDP2 `fully_shard` on every layer, then on the root, after the optional
  activation checkpointing and per-block compile (torchtitan's order: AC, compile, FSDP). On CUDA
  with bf16, parameters are gathered in bf16 and gradients reduced in fp32.
- `full_state(...)` / `load_full_optimizer_state(...)`: a sharded model and optimizer to and from
  full (unsharded) state dicts, so a checkpoint is the same safetensors folder at any world size.

Why routing can never hang FSDP: the unit of sharding is a whole layer (`model.layers[i]`: its
router, predictor, attention and MLP), and the transformer calls every layer's forward for every
batch, whatever the routing; FSDP's all-gather runs in that forward's pre-hook, before the router
decides anything. A rank whose tokens all skip a routed layer still enters the layer, gathers its
weights and leaves with the residual; no collective depends on a routing decision. MoD's top-k is
per sequence, so routing itself needs no communication between ranks.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from typing import Any

import torch

log = logging.getLogger("mixdepth")

MODES = ("auto", "none", "ddp", "fsdp")
"""`train.dist`: auto (ddp under torchrun, none otherwise), none, ddp or fsdp."""


@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ.get('WORLD_SIZE')!r}") from None


def init_from_env(device: torch.device, timeout_s: float = 600) -> Dist:
    """Join the process group torchrun describes (a no-op in a single process); returns the ranks."""
    import torch.distributed as dist

    world = env_world_size()
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if rank:  # rank 0 speaks for the job; the others only warn
        log.setLevel(max(log.level, logging.WARNING))
    log.info("%d ranks joined (%s)", world, "nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local)


def rank_device(device: torch.device, d: Dist) -> torch.device:
    """Each rank's own GPU (`cuda:LOCAL_RANK`); the CPU stays the CPU."""
    return torch.device("cuda", d.local_rank) if device.type == "cuda" and d.active else device


def apply_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # MoE experts that no token of a micro-batch picked get no gradient: DDP must look for them
    moe = bool(getattr(getattr(model, "cfg", None), "moe", None) and model.cfg.moe.n_experts)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=moe)


def apply_fsdp(model: torch.nn.Module, *, bf16: bool = False,
               activation_checkpointing: bool = False, compile: bool = False) -> torch.nn.Module:
    """FSDP2 in place: AC and compile per layer (if asked), then `fully_shard` per layer and on the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = model.layers
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer, preserve_rng_state=True)
    if compile:
        for layer in layers:
            layer.compile()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for i, layer in enumerate(layers):
        # the last layer's parameters are gathered again by the root for backward anyway
        fully_shard(layer, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mp_policy=mp)
    return model


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The full model and optimizer state dicts of a sharded model, on the CPU of rank 0 (a collective:
    every rank calls it; the others get empty dicts). Optimizer state is keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return msd, osd


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[str, Any]) -> None:
    """Load a full optimizer state dict (keyed by parameter name) into the optimizer of a sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


def reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean over ranks (the tensor itself in a single process)."""
    import torch.distributed as dist

    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)  # gloo has no AVG
        t /= dist.get_world_size()
    return t


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
