#!/usr/bin/env python3
"""Thin helpers over ``torch.distributed`` for dataset-scale explanations.

Everything degrades to a no-op in a single process (``torch.distributed`` not
available or not initialized), so callers never branch on it.
"""
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor


def distributed_context() -> Tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_distributed() -> bool:
    return distributed_context()[1] > 1


def _communication_device(tensor: Tensor) -> torch.device:
    # NCCL only reduces CUDA tensors; gloo reduces CPU tensors (and CUDA ones
    # only for some ops), so keep gloo traffic on the host.
    if dist.get_backend() == "nccl":
        if tensor.is_cuda:
            return tensor.device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: Tensor, op: Any) -> Tensor:
    if not _is_distributed():
        return tensor
    comm = tensor.to(_communication_device(tensor), copy=True)
    dist.all_reduce(comm, op=op)
    return comm.to(tensor.device)


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum of ``tensor`` over all ranks, on ``tensor``'s device (returns a new tensor)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(tensor: Tensor) -> Tensor:
    """Elementwise maximum of ``tensor`` over all ranks, on ``tensor``'s device."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if _is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object)."""
    if not _is_distributed():
        return obj
    box: List[Optional[Any]] = [obj]
    device = None
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def rank_chunks(num_chunks: int, rank: int, world_size: int) -> List[int]:
    """Chunks of one rank: r, r + W, r + 2W, ...

    Like ``DistributedSampler`` (rank r takes every W-th item) but over whole
    chunks and without padding, so every chunk is written by exactly one rank
    and nothing is duplicated.
    """
    return list(range(rank, num_chunks, world_size))


__all__ = [
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "broadcast_from_rank0",
    "distributed_context",
    "rank_chunks",
]
