"""Sharded scans with ``torch.distributed``: each rank scans its shard, statistics merge exactly.

Batches formed by normdoctor are dealt round-robin (batch i to rank i mod world size), so the
shards together hold exactly the batches of a one-process scan, and the merged report equals it
up to float64 summation order.  Every accumulator of a :class:`~normdoctor.probe.Recorder` is
a sum, so after re-basing the shards onto one common shift a single ``all_reduce(SUM)`` merges
them; per-batch scores are gathered and put back in global batch order.

A rank that fails does not leave the others waiting: every rank reports success or failure in
one collective before any merge, and all raise together.  (A rank that dies outright is caught
by the process group's timeout, which :func:`init_from_env` sets.)
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .errors import ScanError
from .recording import Recorder

__all__ = [
    "gather_in_batch_order",
    "init_from_env",
    "is_distributed",
    "merge_recorders",
    "raise_if_any_failed",
]

#: Collective timeout set by :func:`init_from_env`: a dead rank fails the run instead of hanging it.
DEFAULT_TIMEOUT = _dt.timedelta(minutes=5)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_from_env(timeout: _dt.timedelta = DEFAULT_TIMEOUT) -> bool:
    """Initialise the default process group when launched by ``torchrun``; True if it did.

    gloo on CPU, NCCL when CUDA is available; the timeout bounds every collective.
    """
    if not dist.is_available() or dist.is_initialized() or "WORLD_SIZE" not in os.environ:
        return False
    if int(os.environ["WORLD_SIZE"]) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=timeout)
    return True


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes of the initialised group."""
    return dist.get_rank(), dist.get_world_size()


def _device_for_collectives() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def raise_if_any_failed(error: BaseException | None) -> None:
    """One collective in which every rank says whether it failed; all raise if any did."""
    messages: list[Any] = [None] * dist.get_world_size()
    text = None if error is None else f"{type(error).__name__}: {error}"
    dist.all_gather_object(messages, text)
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        if error is not None and rank == dist.get_rank() and isinstance(error, ScanError):
            raise error
        raise ScanError(
            f"rank {rank} of {len(messages)} failed: {message.splitlines()[0]}"
        ) from error


def merge_recorders(recorders: Sequence[Recorder]) -> None:
    """Sum every rank's accumulators into every rank's recorders (in place, exactly)."""
    if not recorders:
        return
    device = _device_for_collectives()
    # 1. a common shift per layer: the first rank's that saw the layer at all
    local = []
    for rec in recorders:
        rec.flush()
        c = rec.running_mean.numel()
        has = torch.tensor([0.0 if rec.shift64 is None else 1.0], dtype=torch.float64)
        k = torch.zeros(c, dtype=torch.float64) if rec.shift64 is None else rec.shift64.cpu()
        local.append(torch.cat([has, k]))
    flat = torch.cat(local).to(device)
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    offset = 0
    for rec in recorders:
        c = rec.running_mean.numel()
        for g in gathered:
            if g[offset] > 0:
                rec.rebase(g[offset + 1 : offset + 1 + c].cpu())
                break
        offset += 1 + c
    # 2. one all_reduce of every additive accumulator
    packed = [rec.packed().cpu() for rec in recorders]
    sizes = [p.numel() for p in packed]
    total = torch.cat(packed).to(device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    for rec, part in zip(recorders, total.cpu().split(sizes), strict=True):
        rec.unpack(part.to(rec.device))
    # 3. per-batch scores, back in global batch order
    for rec in recorders:
        scores = (
            torch.cat(rec.unit_scores).cpu()
            if rec.unit_scores
            else torch.empty(0, dtype=torch.float64)
        )
        chunks = list(scores.split(rec.rows_per_call)) if rec.rows_per_call else []
        ordered = gather_in_batch_order(chunks)
        rec.unit_scores = [torch.cat(ordered).to(rec.device)] if ordered else []
        rec.rows_per_call = [c.numel() for c in ordered]


def gather_in_batch_order(items: list[Any]) -> list[Any]:
    """Every rank's per-batch items, interleaved back to global order (batch i on rank i mod W)."""
    world = dist.get_world_size()
    everything: list[Any] = [None] * world
    dist.all_gather_object(everything, items)
    ordered = []
    for i in range(max((len(x) for x in everything), default=0)):
        for rank_items in everything:
            if i < len(rank_items):
                ordered.append(rank_items[i])
    return ordered


def all_reduce_sums(sums: dict[str, torch.Tensor], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """Sum scalar tensors over ranks; only the keys every rank has are returned."""
    device = _device_for_collectives()
    values = torch.tensor(
        [float(sums[k]) if k in sums else 0.0 for k in keys], dtype=torch.float64, device=device
    )
    present = torch.tensor(
        [1.0 if k in sums else 0.0 for k in keys], dtype=torch.float64, device=device
    )
    dist.all_reduce(values)
    dist.all_reduce(present)
    world = dist.get_world_size()
    return {k: values[i].cpu() for i, k in enumerate(keys) if present[i] >= world}
