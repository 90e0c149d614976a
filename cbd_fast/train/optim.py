"""The training optimizer: AdamW that skips the rows of an embedding table no batch has used.

The text tower's token embedding holds most of a small model's parameters (tiny preset: 3.2 M of 3.4 M) while a
scenario's captions use a few dozen token ids. PyTorch's AdamW updates every element every step. For a row whose
gradient has always been zero (its moments are zero) AdamW's update is exactly the weight decay
``p * (1 - lr·wd)``: the Adam term is ``0 / (0 + eps) = 0``. :class:`AdamW` applies that decay to such rows with one
multiply and runs PyTorch's own AdamW arithmetic on the other rows, gathered: the same numbers bit for bit as
``torch.optim.AdamW`` (single-tensor path), in a fraction of the time. Its state and ``state_dict`` are those of
``torch.optim.AdamW``, so checkpoints load in either.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.optim.adamw import adamw as adamw_update


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (``foreach=False``: the single-tensor path, whose numbers do not depend on how the
    parameters are grouped) with ``row_sparse`` parameters — 2-d tables such as ``nn.Embedding.weight`` — updated
    only on their active rows: those with a nonzero gradient now or nonzero moments (a gradient in an earlier
    step). Inactive rows get the decoupled weight decay alone, which is what AdamW computes for them. Results,
    state and ``state_dict`` are identical to ``torch.optim.AdamW(params, foreach=False, ...)``; ``amsgrad`` and
    ``maximize`` are not supported on row-sparse parameters."""

    def __init__(self, params, *, row_sparse: Iterable[torch.Tensor] = (), **options):
        super().__init__(params, foreach=False, **options)
        listed = {id(p) for group in self.param_groups for p in group["params"]}
        self._row_sparse = [p for p in row_sparse if id(p) in listed]
        for p in self._row_sparse:
            if p.dim() != 2:
                raise ValueError(f"row_sparse parameters must be 2-d tables, got shape {tuple(p.shape)}")
        for group in self.param_groups:
            if self._row_sparse and (group["amsgrad"] or group["maximize"]):
                raise ValueError("AdamW with row_sparse parameters supports neither amsgrad nor maximize")
        # rows of each row-sparse parameter whose moments may be nonzero (a superset; recomputed after a load)
        self._active: dict[int, torch.Tensor] = {}

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._active.clear()

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("AdamW.step takes no closure")
        held = [(p, p.grad) for p in self._row_sparse if p.grad is not None]
        for p, _ in held:  # torch's step skips parameters without a gradient
            p.grad = None
        try:
            super().step()
        finally:
            for p, grad in held:
                p.grad = grad
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        for p, grad in held:
            self._step_rows(p, grad, group_of[id(p)])

    def _step_rows(self, param: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[param]
        if not state:  # as torch's AdamW initialises its state
            state["step"] = torch.tensor(0.0, dtype=torch.get_default_dtype())
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        active = self._active.get(id(param))
        if active is None:
            active = (exp_avg != 0).any(1) | (exp_avg_sq != 0).any(1)
        # rows with a gradient other than ±0; two reductions, no temporary the table's size (abs().amax() wrote one)
        active |= (grad.amax(1) != 0) | (grad.amin(1) != 0)  # NaN propagates: active
        # (a row of ±0 gradients stays inactive, exactly: AdamW maps a zero state and a ±0 gradient to zero moments
        # and the decay alone)
        self._active[id(param)] = active
        rows = active.nonzero().squeeze(1)
        gathered = [t.index_select(0, rows) for t in (param, exp_avg, exp_avg_sq)]
        beta1, beta2 = group["betas"]
        adamw_update([gathered[0]], [grad.index_select(0, rows)], [gathered[1]], [gathered[2]], [], [state["step"]],
                     foreach=False, capturable=False, differentiable=False, fused=None, amsgrad=False, beta1=beta1,
                     beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                     maximize=False)
        param.mul_(1 - group["lr"] * group["weight_decay"])  # the inactive rows' whole update, as torch computes it
        for target, rows_now in zip((param, exp_avg, exp_avg_sq), gathered):
            target.index_copy_(0, rows, rows_now)


def create_optimizer(model: nn.Module, parameter_groups: list[dict], lr: float,
                     weight_decay: float) -> torch.optim.AdamW:
    """The training optimizer of ``parameter_groups``: on the CPU, :class:`AdamW` with the model's embedding tables
    as row-sparse parameters; on a GPU, ``torch.optim.AdamW`` with its defaults (its multi-tensor kernels update a
    whole table in a few launches, and skipping rows would cost a device-to-host read of the row count)."""
    tables = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    if any(table.device.type != "cpu" for table in tables):
        return torch.optim.AdamW(parameter_groups, lr=lr, weight_decay=weight_decay)
    return AdamW(parameter_groups, lr=lr, weight_decay=weight_decay, row_sparse=tables)
