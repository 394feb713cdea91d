"""``parallel=fsdp``: full-copy UNets sharded with torch's FSDP2 (``fully_shard``) across the ranks of accelerate's
process group, and the pieces of the training loop that must know about sharded (DTensor) parameters: gradient
clipping, full tensors for checkpoints and export, and loading full tensors back into shards.

What is sharded: every ``UNet2DConditionModel`` of the method that holds trainable full weights (DMD2's / SiD's
full-copy generator and fake score), per down / mid / up block (over 99% of an SDXL UNet's weights; the root's own
small layers, time embeddings and in/out convolutions, stay whole on every rank, so that methods may call blocks
directly, e.g. the GAN head's encoder features), and, with
``fsdp_shard_frozen``, the frozen teacher UNet too (otherwise every rank keeps a full copy). A UNet carrying LoRA
adapters (shared-base and LoRA modes) is left whole: its trainable set is small and its gradients go through the
trainer's flattened all-reduce like ``parallel=ddp`` (as do the root layers' gradients). Trainable parameters stay float32 (the master weights); on a
GPU with ``mixed_precision=bf16`` the forward all-gathers them in bf16 and gradients are reduce-scattered in float32
(``MixedPrecisionPolicy``). Gradients of sharded parameters arrive averaged over ranks.

The same code runs on CPU (gloo) for the tests: accelerate's own FSDP plugin does not distribute on a CPU machine,
so fastdiff calls ``fully_shard`` on accelerate's process group itself, on any device.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

logger = logging.getLogger("fastdiff")


def _has_lora(module: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in module.named_parameters())


def shard(
    method, groups: list, device: torch.device, param_dtype: torch.dtype | None, shard_frozen: bool
) -> list:
    """Shard the method's full-copy UNets in place (see the module docstring) and return ``groups`` with their
    parameters replaced by the sharded ones. ``param_dtype``: the all-gather dtype on a GPU (None: as stored).
    A ValueError when there is nothing to shard (LoRA-only runs: ``parallel=ddp``)."""
    from diffusers import UNet2DConditionModel
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    trainable = {id(p) for g in groups for p in g.params.values()}
    unets = list({id(m): m for m in method.modules() if isinstance(m, UNet2DConditionModel)}.values())
    chosen = []
    for unet in unets:
        holds = any(id(p) in trainable for p in unet.parameters())
        if holds and not _has_lora(unet):
            chosen.append(unet)
        elif not holds and shard_frozen:
            chosen.append(unet)
    if not any(any(id(p) in trainable for p in u.parameters()) for u in chosen):
        raise ValueError(
            "parallel=fsdp shards full-copy UNets, but this run trains LoRA adapters only (shared-base or LoRA "
            "students): use parallel=ddp, whose all-reduce of the small adapter gradients is what FSDP would do"
        )
    where = {id(p): (i, name) for i, u in enumerate(chosen) for name, p in u.named_parameters()}
    # every forward frees its all-gathered weights, the root's too: methods also call networks without grad (no
    # backward would free them), and weights left unsharded would go stale at the next optimizer step
    kw = {"reshard_after_forward": True}
    if device.type == "cuda" and param_dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for unet in chosen:
        blocks = [
            *unet.down_blocks,
            *([unet.mid_block] if unet.mid_block is not None else []),
            *unet.up_blocks,
        ]
        for block in blocks:
            fully_shard(block, **kw)
    sharded = [dict(u.named_parameters()) for u in chosen]

    def moved(p):
        i, name = where.get(id(p), (None, None))
        return p if i is None else sharded[i][name]

    logger.info("parallel=fsdp: %d UNet(s) sharded across ranks", len(chosen))
    method.agree_max = lambda value: _agree_max(value, device)
    return [replace(g, params={k: moved(p) for k, p in g.params.items()}) for g in groups]


def _agree_max(value: int, device: torch.device) -> int:
    import torch.distributed as dist

    t = torch.tensor(
        [int(value)], dtype=torch.int64, device=device
    )  # on the device: NCCL takes no CPU tensor
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def full(t: torch.Tensor) -> torch.Tensor:
    """A tensor's full value: a sharded DTensor's is all-gathered (every rank must call this), others as they are."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_bytes(params) -> int:
    """Bytes of ``params`` this rank holds: its shard of a DTensor, all of a tensor."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in params)


def copy_full_into(dest: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full tensor (the same on every rank) into ``dest``, a tensor or this rank's shard of a DTensor."""
    value = value.to(dest.device, dest.dtype)
    if isinstance(dest, DTensor):
        value = distribute_tensor(value, dest.device_mesh, dest.placements)
    with torch.no_grad():
        dest.copy_(value)


@torch.no_grad()
def clip_grad_norm(params, max_norm: float, reduce_sum) -> torch.Tensor:
    """Scale the gradients of ``params`` so that their global L2 norm is at most ``max_norm``; the norm before.

    A sharded parameter's gradient contributes the squares of this rank's shard, summed over ranks by
    ``reduce_sum``; a whole parameter's gradient (already averaged, the same on every rank) counts once."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g.to_local().float().square().sum() for g in grads if isinstance(g, DTensor)]
    whole = [g.float().square().sum() for g in grads if not isinstance(g, DTensor)]
    zero = torch.zeros((), device=grads[0].device if grads else "cpu")
    total = reduce_sum(torch.stack(sharded).sum().reshape(1) if sharded else zero.reshape(1))[0]
    total = (total + (torch.stack(whole).sum() if whole else zero).to(total.device)).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        (g.to_local() if isinstance(g, DTensor) else g).mul_(scale.to(g.device))
    return total
