"""Data-parallel training over processes: process-group set-up, feature gathering with gradient, gradient
averaging, and the few broadcasts a run needs.

A run is distributed when it is started by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) or by ``srun`` with one task per device (``SLURM_PROCID``,
``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID``; ``MASTER_ADDR`` and ``MASTER_PORT`` come from the job script). Every rank builds the same model
from the same seed and applies the same averaged gradients, so the parameters stay bitwise identical on all ranks.

Loss semantics (DESIGN §6.2): each rank computes its loss terms in the *local-loss* form of open_clip — the rows of
the global-batch terms that belong to its samples, against the features of every rank's samples gathered with
their gradient — and weights its total by its share ``n_r / N`` of the global batch; gradients are then summed
over ranks. The sum of the ranks' weighted losses is the single-process loss on the global batch.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..config import ConfigError

_TIMEOUT = datetime.timedelta(minutes=60)  # other ranks wait at a broadcast while rank 0 evaluates


def launch_environment(env: Optional[dict] = None) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's variables, else SLURM's, else ``(0, 1, 0)``."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_PROCID" in env and env.get("SLURM_STEP_NUM_TASKS", "1") != "1":
        # a task of an srun step (the batch script itself has no SLURM_STEP_NUM_TASKS, so a cbd-train started
        # there, or by torchrun there, is not mistaken for one rank of many)
        names = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")
    else:
        return 0, 1, 0
    try:
        rank, world, local = (int(env.get(name, "0")) for name in names)
    except ValueError:
        raise ConfigError(f"distributed launch: {', '.join(names)} must be integers, got "
                          f"{', '.join(repr(env.get(name)) for name in names)}") from None
    if not 0 <= rank < world:
        raise ConfigError(f"distributed launch: {names[0]}={rank} is not in [0, {names[1]}={world})")
    if names[0] == "SLURM_PROCID" and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        raise ConfigError("distributed launch under SLURM needs MASTER_ADDR and MASTER_PORT in the environment "
                          "(README, Scaling out: the sbatch script sets them), or start the ranks with torchrun")
    return rank, world, local


@dataclass
class Distributed:
    """The process group of a run, or a single process (``world_size == 1``: every collective is a no-op)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes outputs, checkpoints and logs."""
        return self.rank == 0

    # --- set-up --------------------------------------------------------------------------------------------------

    @classmethod
    def from_environment(cls, device: torch.device) -> "Distributed":
        """Join the process group described by the environment (see the module docstring); NCCL on CUDA devices,
        gloo on the CPU. A single process needs no environment and joins nothing."""
        rank, world, local = launch_environment()
        if world == 1:
            return cls()
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            os.environ.setdefault("RANK", str(rank))
            os.environ.setdefault("WORLD_SIZE", str(world))
            kwargs = {"device_id": device} if backend == "nccl" else {}
            dist.init_process_group(backend, timeout=_TIMEOUT, **kwargs)
        return cls(rank, world, local, backend)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    # --- collectives ---------------------------------------------------------------------------------------------

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather(self, x: torch.Tensor, sizes: Sequence[int], grad: bool = True) -> torch.Tensor:
        """Every rank's ``x[n_r, ...]`` concatenated in rank order: ``[Σ n_r, ...]``; ``sizes[r] = n_r`` (known to
        every rank). With ``grad`` the gradient of each rank's slice is the sum of the gradients all ranks send to
        it (open_clip's ``gather_with_grad``)."""
        if not self.enabled:
            return x
        if grad and x.requires_grad:
            return _GatherWithGrad.apply(x, tuple(sizes), self.rank, self.backend)
        return _gather(x.detach(), sizes)

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.enabled:
            dist.all_reduce(x)
        return x

    def sum_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Sum every parameter's gradient over ranks (one flat all-reduce per dtype). A parameter that got a
        gradient on some rank gets one on all (zeros where it had none); one that got none anywhere keeps
        ``grad=None``, so that the optimizer skips it on every rank as a single process would."""
        if not self.enabled:
            return
        params = list(params)
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32,
                               device=params[0].device if params else "cpu")
        dist.all_reduce(present, op=dist.ReduceOp.MAX)
        with_grad = [p for p, flag in zip(params, present.tolist()) if flag]
        for p in with_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for dtype in sorted({p.grad.dtype for p in with_grad}, key=str):
            grads = [p.grad for p in with_grad if p.grad.dtype == dtype]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(summed)

    def broadcast_json(self, value: Any, device: torch.device) -> Any:
        """Rank 0's ``value`` (JSON-serialisable) on every rank; JSON, not pickle, so that nothing received can
        run code."""
        if not self.enabled:
            return value
        payload = json.dumps(value).encode() if self.is_main else b""
        length = torch.tensor([len(payload)], dtype=torch.long, device=device)
        dist.broadcast(length, 0)
        data = torch.zeros(int(length), dtype=torch.uint8, device=device)
        if self.is_main:
            data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        dist.broadcast(data, 0)
        return json.loads(bytes(data.cpu().tolist()).decode())

    def gather_json(self, value: Any, device: torch.device) -> list:
        """Every rank's ``value`` (JSON-serialisable), in rank order, on every rank."""
        if not self.enabled:
            return [value]
        payload = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8).to(device)
        lengths = _gather(torch.tensor([payload.numel()], dtype=torch.long, device=device), [1] * self.world_size)
        lengths = lengths.tolist()
        data = _gather(payload, lengths).cpu()
        values, start = [], 0
        for length in lengths:
            values.append(json.loads(bytes(data[start:start + length].tolist()).decode()))
            start += length
        return values

    def disagreement(self, value: Any, device: torch.device) -> Optional[list]:
        """None when every rank holds the same ``value`` (JSON-serialisable), else every rank's value in rank
        order — on every rank, so that all ranks can raise the same error instead of some of them waiting forever
        in the next collective. One all-reduce of a 56-bit digest; the values travel only when they differ."""
        if not self.enabled:
            return None
        digest = int.from_bytes(hashlib.blake2b(json.dumps(value, sort_keys=True).encode(), digest_size=7).digest(),
                                "little")
        extremes = torch.tensor([digest, -digest], dtype=torch.long, device=device)
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)  # [max, -min] of the digests
        largest, smallest = extremes.tolist()
        if largest == -smallest:
            return None
        return self.gather_json(value, device)


def _gather(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """All ranks' ``x`` padded to the largest ``n_r`` (all_gather needs equal shapes), then trimmed."""
    largest = max(sizes)
    padded = x if x.shape[0] == largest else torch.cat([x, x.new_zeros((largest - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """Forward: :func:`_gather`. Backward: the gradient of the concatenation is summed over ranks (every rank's
    loss depends on every slice) and each rank keeps its own slice: a reduce-scatter (NCCL), or an all-reduce
    and a slice where the backend has no reduce-scatter (gloo)."""

    @staticmethod
    def forward(ctx, x, sizes, rank, backend):
        ctx.sizes, ctx.rank, ctx.backend = sizes, rank, backend
        return _gather(x, sizes)

    @staticmethod
    def backward(ctx, grad):
        sizes, largest = ctx.sizes, max(ctx.sizes)
        pieces = []
        for piece in torch.split(grad.contiguous(), list(sizes)):
            pad = largest - piece.shape[0]
            pieces.append(piece if not pad else torch.cat([piece, piece.new_zeros((pad, *piece.shape[1:]))]))
        stacked = torch.stack(pieces)  # [W, largest, ...]
        if ctx.backend == "nccl":
            mine = torch.empty_like(stacked[0])
            dist.reduce_scatter_tensor(mine, stacked)
        else:
            dist.all_reduce(stacked)
            mine = stacked[ctx.rank]
        return mine[:sizes[ctx.rank]], None, None, None


def shard_bounds(count: int, world_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each rank's contiguous share of ``count`` rows: sizes differ by at most one, the larger
    shares first (the shares in rank order make up ``0..count`` in order)."""
    base, extra = divmod(count, world_size)
    bounds, start = [], 0
    for rank in range(world_size):
        end = start + base + (rank < extra)
        bounds.append((start, end))
        start = end
    return bounds
