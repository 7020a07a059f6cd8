"""`UniversalTrainer`: the original framework's single-model API on ufw's objective.

`create_optimizer`, `train_epoch`, `evaluate` and friends for one model (K = 1), on the same
loss and evaluation code as a population (ufw.objective).
"""

from __future__ import annotations

import math

import torch

from ufw.config import UniversalConfig
from ufw.model import EarlyExitLM, ModelShape, layer_of
from ufw.objective import Objective, active_layers
from ufw.optimizer import clip_groups
from ufw.teacher import load_teacher


class UniversalTrainer:
    """The framework's single-model API, on ufw's loss and evaluation.

    Same methods, arguments and return shapes as the framework's `UniversalTrainer`, so a
    script written for it runs on ufw by changing its imports:

        trainer = UniversalTrainer(config, vocab_size, device)
        model = trainer.create_model()                  # ufw's addition: the seed model
        optimizer = trainer.create_optimizer(model, base_lr=1e-3)
        for epoch in range(max_epochs):                 # epochs counted from 0, as there
            loss, weights = trainer.train_epoch(model, train_batches, optimizer, 1.0,
                                                epoch=epoch, max_epochs=max_epochs)
            stats = trainer.evaluate(model, val_batches)  # ppl, acc, shallow_ratio, compute_cost

    One deliberate difference: `grad_clip=0` means no clipping (torch's clip_grad_norm_ with
    max_norm 0, which the framework calls unconditionally, would zero every gradient).
    """

    def __init__(self, config: UniversalConfig, vocab_size: int, device: str = "cpu"):
        self.config = config.validate()
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        teacher = load_teacher(config.teacher, self.device, vocab_size)
        self.objective = Objective([config], self.device, teacher)
        # The alpha schedule's position, as the framework keeps it (set by train_epoch).
        self.current_epoch = 0
        self.max_epochs = 1

    def set_training_state(self, epoch: int, max_epochs: int) -> None:
        """Where training is (epoch counted from 0), for the alpha schedule."""
        self.current_epoch, self.max_epochs = epoch, max_epochs

    def get_current_weights(self) -> dict[int, float]:
        """Loss weight of every layer at the current training state."""
        return self.config.get_layer_weights(self.current_epoch, self.max_epochs)

    def create_model(self) -> EarlyExitLM:
        """The configuration's model (K = 1), initialised from `config.seed`."""
        shape = ModelShape.of(self.config, self.vocab_size)
        return EarlyExitLM(shape, [self.config.seed]).to(self.device)

    def create_optimizer(self, model: EarlyExitLM,
                         base_lr: float | None = None) -> torch.optim.AdamW:
        """AdamW with a group per block (`layer_i`, base_lr * its scale), then `other`
        (embedding, head) at base_lr. base_lr None means `config.lr`."""
        base_lr = self.config.lr if base_lr is None else base_lr
        groups: dict[int | None, list] = {}
        for name, p in model.named_member_params():
            groups.setdefault(layer_of(name), []).append(p)
        blocks_first = sorted(groups, key=lambda layer: math.inf if layer is None else layer)
        return torch.optim.AdamW(
            [{"params": groups[layer], "name": f"layer_{layer}" if layer else "other",
              "lr": base_lr * (self.config.lr_scale(layer) if layer else 1.0)}
             for layer in blocks_first],
            lr=base_lr, weight_decay=self.config.weight_decay)

    def compute_loss(self, model: EarlyExitLM, x: torch.Tensor, y: torch.Tensor,
                     weights: dict[int, float] | None = None) -> torch.Tensor:
        """sum_i w_i * L_i (plus the extensions' terms) as a scalar.

        `weights` ({layer: weight}) overrides the current training state's; layers without
        a positive weight cost nothing, and if none has one the final layer trains alone.
        """
        weights = self.get_current_weights() if weights is None else weights
        layers = range(1, self.config.num_layers + 1)
        row = torch.tensor([[float(weights.get(i, 0.0)) for i in layers]], device=self.device)
        if not (row > 0).any():
            row[0, -1] = 1.0
        return self.objective.loss(model, x, y, row, active_layers(row)).sum()

    def train_epoch(self, model: EarlyExitLM, train_batches, optimizer: torch.optim.Optimizer,
                    grad_clip: float = 1.0, epoch: int = 0,
                    max_epochs: int = 1) -> tuple[float, dict[int, float]]:
        """One pass over `train_batches`; returns (mean loss, the layer weights used).

        `epoch` counts from 0 and with `max_epochs` places the alpha schedule; `grad_clip`
        is the gradient norm's limit, 0 for none.
        """
        model.train()
        self.set_training_state(epoch, max_epochs)
        weights = self.get_current_weights()
        total, count = 0.0, 0
        for x, y in train_batches:
            optimizer.zero_grad()
            loss = self.compute_loss(model, x.to(self.device), y.to(self.device), weights)
            loss.backward()
            if grad_clip > 0:
                for group in clip_groups(model):
                    torch.nn.utils.clip_grad_norm_(group, grad_clip)
            optimizer.step()
            total, count = total + loss.item(), count + 1
        return total / max(1, count), weights

    @torch.no_grad()
    def evaluate(self, model: EarlyExitLM, val_batches) -> dict[str, float]:
        """Routed validation metrics: ppl, acc, shallow_ratio, compute_cost."""
        model.eval()
        batches = [(x.to(self.device), y.to(self.device)) for x, y in val_batches]
        stats = self.objective.evaluate(model, batches)
        return {k: float(stats[k][0]) for k in ("ppl", "acc", "shallow_ratio", "compute_cost")}
