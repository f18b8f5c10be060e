"""Fitting across processes (``torch.distributed``): whether to, and a collective that keeps ranks in step."""

from __future__ import annotations

import torch

__all__ = ["sync_shards", "use_distributed"]


def use_distributed(distributed: bool | None) -> bool:
    """Resolve a ``distributed=`` argument: None means "when torch.distributed is initialized".

    Raises
    ------
    ValueError
        If ``distributed=True`` and no process group is initialized.
    """
    import torch.distributed as dist

    initialized = dist.is_available() and dist.is_initialized()
    if distributed is None:
        return initialized
    if distributed and not initialized:
        raise ValueError(
            "distributed=True needs an initialized torch.distributed process group: call "
            "torch.distributed.init_process_group first (torchrun sets the environment it reads)"
        )
    return bool(distributed)


def sync_shards(
    error: BaseException | None, shape: tuple[int, ...] | None, device: torch.device
) -> list[tuple[int, ...] | None]:
    """Exchange, across the process group, whether each rank's local pass failed and what it saw.

    Every rank calls this after a local pass, error or not, so that no rank is left waiting in
    a later collective. If any rank failed, every rank raises: the failed ranks their own error,
    the others a RuntimeError naming the failed ranks.

    Parameters
    ----------
    error : BaseException or None
        What this rank's local pass raised.
    shape : tuple of int or None
        The input shape (C, H, W) this rank saw; None for an empty shard.
    device : torch.device
        Where the exchanged tensor lives (the model's device: CUDA for ``nccl``).

    Returns
    -------
    list of (tuple of int or None)
        The shape each rank saw, indexed by rank.
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    table = torch.zeros(world, 5, dtype=torch.int64, device=device)  # (ranks, [failed, seen, C, H, W])
    table[rank, 0] = int(error is not None)
    if shape is not None:
        table[rank, 1] = 1
        table[rank, 2:] = torch.tensor(shape, dtype=torch.int64)
    dist.all_reduce(table)
    table = table.cpu()
    failed = table[:, 0].nonzero().flatten().tolist()
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"fit failed on rank(s) {failed} of {world}; see the error raised there")
    return [tuple(row[2:].tolist()) if row[1] else None for row in table]
