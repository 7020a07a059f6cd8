"""The population's objective: per-member training loss and routed evaluation.

`Objective` holds what the loss and evaluation need per member (layer weights, thresholds,
distillation, confidence methods, extension weights) and the numeric precision they run at.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ufw.config import PRECISIONS, ConfigError, UniversalConfig
from ufw.model import EarlyExitLM
from ufw.routing import assign_exits, confidence, routed_metrics, threshold_curve


class Objective:
    """Per-member loss and evaluation, for configurations that share one model shape."""

    def __init__(self, configs: list[UniversalConfig], device: str | torch.device = "cpu",
                 teacher: EarlyExitLM | None = None, precision: str = "fp32"):
        self.configs = configs
        self.num_layers = configs[0].num_layers
        self.exits = configs[0].exits
        # The structure the loss is traced with: fixed for the objective's lifetime (a slot
        # refilled by `set_members` must fit it; see Population.can_host).
        self.distill = any(c.distillation_alpha < 1 for c in configs)
        self.methods = sorted({c.confidence_method for c in configs})
        # Per-member values, each a tensor with a leading member axis.
        columns = zip(*(self._member_values(c) for c in configs))
        values = [torch.tensor(column, device=device) for column in columns]
        (self.thresholds, self.distill_alpha, self.temperature, self.conf_weight,  # [K, E], [K]..
         self.moe_weight, self.method_index) = values
        self.teacher = teacher
        if precision not in PRECISIONS:
            raise ConfigError(f"precision: {precision!r}; allowed: {', '.join(PRECISIONS)}")
        # fp32 is exact and the default. tf32 rounds matrix-product inputs to 10 mantissa
        # bits on tensor cores; bf16 also runs the forward pass in bfloat16 (autocast), with
        # fp32 master weights, optimizer and losses. Both trade exactness for GPU speed.
        self.device_type = torch.device(device).type
        self.bf16 = precision == "bf16"
        # Process-wide switches: set both ways, so an fp32 run after a bf16 one is exact again.
        torch.backends.cuda.matmul.allow_tf32 = precision in ("tf32", "bf16")
        torch.backends.cudnn.allow_tf32 = precision in ("tf32", "bf16")

    def _member_values(self, config: UniversalConfig) -> tuple:
        """One member's row of the per-member tensors, in their order (see __init__)."""
        return ([float(t) for t in config.thresholds], float(config.distillation_alpha),
                float(config.distillation_temperature), float(config.confidence_loss_weight),
                float(config.moe_aux_weight), self.methods.index(config.confidence_method))

    def hosts(self, config: UniversalConfig) -> bool:
        """Whether `config` fits what this objective computes: its confidence method is one
        evaluated here, and its distillation needs no term that the loss leaves out."""
        return config.confidence_method in self.methods and (
            self.distill or config.distillation_alpha == 1)

    @torch.no_grad()
    def set_members(self, slots: list[int], configs: list[UniversalConfig]) -> None:
        """Members `slots` become `configs` (ones that `hosts` accepts). In place: a captured
        CUDA graph reads these tensors. One write per tensor for all the slots."""
        for k, config in zip(slots, configs, strict=True):
            self.configs[k] = config
        tensors = (self.thresholds, self.distill_alpha, self.temperature, self.conf_weight,
                   self.moe_weight, self.method_index)
        index = torch.tensor(slots, device=self.thresholds.device)
        columns = zip(*(self._member_values(c) for c in configs))
        for tensor, column in zip(tensors, columns):
            tensor.index_copy_(0, index, torch.tensor(column, dtype=tensor.dtype,
                                                      device=tensor.device))

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device_type, torch.bfloat16, enabled=self.bf16)

    def layer_weights(self, epochs: int | list[int]) -> torch.Tensor:
        """[K, L] loss weight of every layer for every member at its epoch (counted from 0):
        `epochs` has one per member, or is one epoch for all."""
        if isinstance(epochs, int):
            epochs = [epochs] * len(self.configs)
        rows = []
        for c, epoch in zip(self.configs, epochs, strict=True):
            w = c.get_layer_weights(epoch, c.max_epochs)
            rows.append([w[i] for i in range(1, self.num_layers + 1)])
        return torch.tensor(rows, dtype=torch.float32, device=self.thresholds.device)

    def loss(self, model: EarlyExitLM, x: torch.Tensor, y: torch.Tensor,
             weights: torch.Tensor, active_layers: list[int]) -> torch.Tensor:
        with self.autocast():
            return self._loss(model, x, y, weights, active_layers)

    def _loss(self, model: EarlyExitLM, x: torch.Tensor, y: torch.Tensor,
              weights: torch.Tensor, active_layers: list[int]) -> torch.Tensor:
        """Per-member training loss [K]: sum_i w_i * L_i, plus the extensions' terms.

        Only `active_layers` (those some member weighs > 0) pay for head and CE, so a
        standard LM costs one head, as the framework specifies.
        """
        K = model.num_members
        learned = model.shape.learned_confidence
        needed = sorted(set(active_layers) | (set(self.exits) if learned else set()))
        self_distill = self.distill and self.teacher is None
        hidden, balance = model(x, upto=self.num_layers if self_distill else max(needed))
        targets = y.reshape(1, -1).expand(K, -1)
        teacher_logits = self._teacher_logits(model, hidden, x) if self.distill else None
        total = torch.zeros(K, device=x.device)
        for i in needed:
            logits = model.logits(hidden[i - 1])
            if i in active_layers:
                term = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                       reduction="none").view(K, -1).mean(-1)
                # The final exit is its own teacher under self-distillation: task loss only.
                if teacher_logits is not None and (i < self.num_layers or self.teacher is not None):
                    a = self.distill_alpha
                    kl = distillation_kl(teacher_logits, logits, self.temperature)
                    term = a * term + (1 - a) * kl
                total = total + weights[:, i - 1] * term
            if learned and i in self.exits:
                # The head learns to read the exit's state, not to reshape it: detached input.
                conf = model.confidence_logit(hidden[i - 1].detach(), i)
                right = (logits.detach().argmax(-1) == targets).float()
                bce = F.binary_cross_entropy_with_logits(conf, right, reduction="none").mean(-1)
                total = total + self.conf_weight * bce
        if balance is not None:
            total = total + self.moe_weight * balance
        return total

    def _teacher_logits(self, model, hidden, x) -> torch.Tensor:
        """The teacher's logits, without gradient: the model's own final exit or a saved model's."""
        if self.teacher is None:
            return model.logits(hidden[-1]).detach()
        with torch.no_grad():
            return self.teacher.logits(self.teacher(x)[0][-1])

    @torch.no_grad()
    def evaluate(self, model: EarlyExitLM, batches) -> dict[str, torch.Tensor]:
        """Routed metrics per member, plus the threshold curve, from one pass over `batches`."""
        confs, ces, rights = [], [], []
        with self.autocast():
            for x, y in batches:
                hidden, _ = model(x)
                targets = y.reshape(1, -1).expand(model.num_members, -1)
                conf_b, ce_b, right_b = [], [], []
                for i in [*self.exits, self.num_layers]:
                    logits = model.logits(hidden[i - 1]).float()
                    ce_b.append(F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                reduction="none").view(targets.shape))
                    right_b.append(logits.argmax(-1) == targets)
                    if i != self.num_layers:
                        conf_b.append(self._confidence(model, hidden[i - 1], logits, i))
                confs.append(torch.stack(conf_b))
                ces.append(torch.stack(ce_b))
                rights.append(torch.stack(right_b))
        conf, ce, right = torch.cat(confs, -1), torch.cat(ces, -1), torch.cat(rights, -1)
        stats = routed_metrics(assign_exits(conf, self.thresholds), ce, right, self.exits,
                               self.num_layers, model.shape.experts_top_k)
        curve = threshold_curve(conf, ce, right, self.exits, self.num_layers)
        stats.update({f"curve_{k}": v for k, v in curve.items()})
        return stats

    def _confidence(self, model, h, logits, exit_layer) -> torch.Tensor:
        """Each member's own confidence measure: [K, N]."""
        per_method = []
        for method in self.methods:
            if method == "learned":
                per_method.append(torch.sigmoid(model.confidence_logit(h, exit_layer)))
            else:
                per_method.append(confidence(logits, method))
        stacked = torch.stack(per_method)  # [M, K, N]
        return stacked.gather(0, self.method_index[None, :, None].expand(1, *stacked.shape[1:]))[0]


def distillation_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                    temperature: torch.Tensor | float) -> torch.Tensor:
    """T^2 * KL(teacher || student) of the distributions softened by T, per member.

    Logits [K, N, V] (a teacher with K = 1 serves every member); temperature a number or [K].
    Mean over the N tokens of sum_v p_t(v) (log p_t(v) - log p_s(v)), times T^2 so that the
    gradient keeps its scale across temperatures (Hinton et al., 2015). Returns [K].
    """
    T = torch.as_tensor(temperature, dtype=torch.float32, device=student_logits.device)
    T = T.reshape(-1, 1, 1) if T.dim() else T
    teacher_logp = F.log_softmax(teacher_logits.float() / T, dim=-1)
    student_logp = F.log_softmax(student_logits.float() / T, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean(-1)
    return kl * T.reshape(-1) ** 2


def active_layers(weights: torch.Tensor) -> list[int]:
    """Layers (1-indexed) that any member weighs > 0 at this epoch."""
    return [i + 1 for i in torch.nonzero(weights.cpu().amax(0) > 0).flatten().tolist()]

