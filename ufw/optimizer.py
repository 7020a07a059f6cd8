"""The population's optimizer: AdamW with per-member, per-layer learning rates and
per-member gradient clipping."""

from __future__ import annotations

import torch

from ufw.config import UniversalConfig
from ufw.model import EarlyExitLM, is_confidence_head, layer_of


def clip_groups(model: EarlyExitLM) -> list[list[torch.Tensor]]:
    """Parameters whose gradients are clipped together: the language model, and (if any) the
    learned confidence heads. Their loss reaches the heads only (detached input), so a shared
    gradient norm would be its one way to rescale the language model's step."""
    named = model.named_member_params()
    groups = [[p for n, p in named if not is_confidence_head(n)],
              [p for n, p in named if is_confidence_head(n)]]
    return [g for g in groups if g]


class PopulationAdamW:
    """AdamW (torch's defaults and update rule) whose learning rate is per member and layer.

    Its arithmetic is torch.optim.AdamW's: the scalars that torch computes in double
    precision on the host (1 - lr * weight_decay, lr / (1 - beta1^t), sqrt(1 - beta2^t))
    are computed in float64 here too, and rounded to fp32 once, so that the updates equal
    torch's (tested to 1e-7 over 100 steps). Frozen members get learning rate 0 and no
    weight decay: their parameters stay exactly as they were.
    """

    def __init__(self, model: EarlyExitLM, configs: list[UniversalConfig],
                 betas=(0.9, 0.999), eps: float = 1e-8, compile: bool = False):
        device = next(model.parameters()).device
        self.params = [p for _, p in model.named_member_params()]
        self.clip_groups = clip_groups(model)
        self._layers = [layer_of(n) for n, _ in model.named_member_params()]
        # Per parameter, indexed by member: [K] learning rates (float64, as torch's host
        # arithmetic) and [K] decay factors 1 - lr * weight_decay; rows of one [P, K] table
        # each, so that refilling members writes each table once.
        lrs, decays = zip(*(self._hyperparameters(c) for c in configs))
        self._lr_table = torch.tensor(lrs, dtype=torch.float64, device=device).T.contiguous()
        self._decay_table = torch.tensor(decays, device=device).T.contiguous()
        self.lrs, self.decays = list(self._lr_table), list(self._decay_table)
        self.grad_clip = torch.tensor([c.grad_clip for c in configs], device=device)
        self.betas, self.eps = betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        # Steps taken per member: a member that replaces another in its slot starts from 0
        # (its own bias corrections). float64: beta2^t in fp32 starts from 0.999 rounded
        # up, which makes 1 - beta2^t 1.3e-5 too small and every update ~1e-5 too small.
        self.steps = torch.zeros(len(configs), dtype=torch.float64, device=device)
        # Compiled, each parameter's ~14 element-wise operations fuse into a few kernels:
        # eager, the update was most of the ~33,000 kernels of a K = 256 epoch on an H200.
        self._update = torch.compile(self._update_eager, dynamic=False) if compile else (
            self._update_eager)

    def _hyperparameters(self, config: UniversalConfig) -> tuple[list[float], list[float]]:
        """One member's learning rate and decay factor for every parameter, in order."""
        lrs = [config.lr * (config.lr_scale(layer) if layer else 1.0) for layer in self._layers]
        return lrs, [1 - lr * config.weight_decay for lr in lrs]

    @torch.no_grad()
    def set_members(self, slots: list[int], configs: list[UniversalConfig]) -> None:
        """Members `slots`' learning rates, decays and gradient clips from `configs`.

        Indexed writes, in place (a captured CUDA graph reads these tensors): one per table
        for all the slots. On a GPU shared with another trial each small write can wait for
        the other process's turn on the GPU."""
        index = torch.tensor(slots, device=self.steps.device)
        lrs, decays = zip(*(self._hyperparameters(c) for c in configs))
        for table, values in ((self._lr_table, lrs), (self._decay_table, decays)):
            table.index_copy_(1, index, torch.tensor(values, dtype=table.dtype,
                                                     device=table.device).T)
        self.grad_clip.index_copy_(0, index, torch.tensor(
            [c.grad_clip for c in configs], dtype=self.grad_clip.dtype, device=index.device))

    @torch.no_grad()
    def zero_member_state(self, slots: list[int]) -> None:
        """Members `slots`' moments and step counts back to 0, as a new optimizer's (in place)."""
        index = torch.tensor(slots, device=self.steps.device)
        for state in (*self.m, *self.v, self.steps):
            state.index_fill_(0, index, 0)

    def clip_(self) -> None:
        """Clip each member's gradient to its own global norm (0 disables clipping).

        Per clip group (see `clip_groups`): learned confidence heads are clipped apart.
        """
        for group in self.clip_groups:
            grads = [p.grad for p in group if p.grad is not None]
            if not grads:
                continue
            # A running sum: inductor failed on torch.stack(...).sum(0) here (torch 2.13).
            norm = sum(g.pow(2).flatten(1).sum(1) for g in grads).sqrt()
            coef = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            coef = torch.where(self.grad_clip > 0, coef, torch.ones_like(coef))
            for g in grads:
                g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))

    def step(self, active: torch.Tensor, clip: bool = False) -> None:
        """One AdamW step, after `clip_` when `clip`; `active` [K] is 1 for members that train,
        0 for frozen ones. The gradients are cleared."""
        self._update(active, clip)
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def _update_eager(self, active: torch.Tensor, clip: bool) -> None:
        if clip:
            self.clip_()
        # The step count lives on the device, so a step has no host sync and no Python
        # number that changes from step to step (which would defeat graph capture).
        self.steps.add_(1)
        b1, b2 = self.betas
        bias1 = 1 - b1 ** self.steps  # [K] float64, as torch's host arithmetic
        bias2_sqrt = (1 - b2 ** self.steps).sqrt().float()
        running = active > 0
        for p, m, v, lr, decay in zip(self.params, self.m, self.v, self.lrs, self.decays):
            if p.grad is None:  # a block above every weighted exit: untouched, as torch's
                continue        # AdamW leaves a parameter without a gradient
            shape = (-1, *[1] * (p.dim() - 1))
            step_size = ((lr / bias1).float() * active).view(shape)
            p.mul_(torch.where(running, decay, 1.0).view(shape))
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.sub_(step_size * m / (v.sqrt() / bias2_sqrt.view(shape) + self.eps))

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        for mine, saved in zip(self.m + self.v, state["m"] + state["v"]):
            mine.copy_(saved)
        # A checkpoint from before per-member step counts holds one scalar: every member's.
        self.steps.copy_(torch.as_tensor(state["steps"]).expand_as(self.steps))

