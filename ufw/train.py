"""Training: K configurations of one shape trained at once as a population.

`train(configs, corpus)` is the whole method of docs/design.md as one function of its
configurations (PureJaxRL's `make_train` idea): weighted multi-exit loss with per-member
weights per epoch, AdamW with per-member, per-layer learning rates, per-member gradient
clipping, routed evaluation, and early stopping per member. A member that stops is frozen
(its learning rate becomes 0) and keeps its best metrics.

`UniversalTrainer` keeps the seed framework's API (`create_optimizer`, `train_epoch`,
`evaluate`) for one model on top of the same loss and evaluation code.

Run `python -m ufw.train --preset asymmetric_best` for one run printed as a JSON row.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import ufw
from ufw import tensorfile
from ufw.config import PRECISIONS, ConfigError, UniversalConfig
from ufw.data import Corpus
from ufw.memory import check_fits
from ufw.model import EarlyExitLM, ModelShape, is_confidence_head, layer_of
from ufw.results import EMPTY_METRICS, json_row
from ufw.routing import THRESHOLD_GRID, assign_exits, confidence, routed_metrics, threshold_curve


class Objective:
    """Per-member loss and evaluation, for configurations that share one model shape."""

    def __init__(self, configs: list[UniversalConfig], device: str | torch.device = "cpu",
                 teacher: EarlyExitLM | None = None, precision: str = "fp32"):
        def per_member(values):
            return torch.tensor(values, dtype=torch.float32, device=device)

        self.configs = configs
        self.num_layers = configs[0].num_layers
        self.exits = configs[0].exits
        self.thresholds = per_member([c.thresholds for c in configs])  # [K, E]
        self.distill_alpha = per_member([c.distillation_alpha for c in configs])
        self.temperature = per_member([c.distillation_temperature for c in configs])
        self.distill = any(c.distillation_alpha < 1 for c in configs)
        self.conf_weight = per_member([c.confidence_loss_weight for c in configs])
        self.moe_weight = per_member([c.moe_aux_weight for c in configs])
        self.methods = sorted({c.confidence_method for c in configs})
        self.method_index = torch.tensor([self.methods.index(c.confidence_method)
                                          for c in configs], device=device)
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

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device_type, torch.bfloat16, enabled=self.bf16)

    def layer_weights(self, epoch: int) -> torch.Tensor:
        """[K, L] loss weight of every layer for every member at this epoch."""
        rows = []
        for c in self.configs:
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
                 betas=(0.9, 0.999), eps: float = 1e-8):
        device = next(model.parameters()).device
        self.params = [p for _, p in model.named_member_params()]
        self.clip_groups = clip_groups(model)
        per_param_lrs = [[c.lr * (c.lr_scale(layer) if layer else 1.0) for c in configs]
                         for layer in (layer_of(n) for n, _ in model.named_member_params())]
        self.lrs = [torch.tensor(lrs, dtype=torch.float64, device=device) for lrs in per_param_lrs]
        self.decays = [torch.tensor([1 - lr * c.weight_decay for lr, c in zip(lrs, configs)],
                                    device=device) for lrs in per_param_lrs]
        self.grad_clip = torch.tensor([c.grad_clip for c in configs], device=device)
        self.betas, self.eps = betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        # float64: beta2^t in fp32 starts from 0.999 rounded up, which makes 1 - beta2^t
        # 1.3e-5 too small and every update ~1e-5 too small.
        self.steps = torch.zeros((), dtype=torch.float64, device=device)

    def clip_(self) -> None:
        """Clip each member's gradient to its own global norm (0 disables clipping).

        Per clip group (see `clip_groups`): learned confidence heads are clipped apart.
        """
        for group in self.clip_groups:
            grads = [p.grad for p in group if p.grad is not None]
            if not grads:
                continue
            norm = torch.stack([g.pow(2).flatten(1).sum(1) for g in grads]).sum(0).sqrt()
            coef = (self.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            coef = torch.where(self.grad_clip > 0, coef, torch.ones_like(coef))
            for g in grads:
                g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))

    @torch.no_grad()
    def step(self, active: torch.Tensor) -> None:
        """One AdamW step; `active` [K] is 1 for members that train, 0 for frozen ones."""
        # The step count lives on the device, so a step has no host sync and no Python
        # number that changes from step to step (which would defeat graph capture).
        self.steps += 1
        b1, b2 = self.betas
        bias1 = 1 - b1 ** self.steps  # float64, as torch's host arithmetic
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
            p.sub_(step_size * m / (v.sqrt() / bias2_sqrt + self.eps))
            p.grad = None

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        for mine, saved in zip(self.m + self.v, state["m"] + state["v"]):
            mine.copy_(saved)
        self.steps.copy_(state["steps"])


@dataclass
class MemberRecord:
    """Early-stopping bookkeeping and best-epoch metrics of one member.

    Epochs here are numbered as users see them, from 1 (as the framework reports its best
    epoch); best_epoch 0 means no finite epoch yet.
    """

    status: str = "running"  # running, completed, failed
    error: str = ""
    best_ppl: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    epochs_run: int = 0
    train_seconds: float = 0.0
    best: dict[str, Any] = field(default_factory=dict)

    def observe(self, epoch: int, ppl: float, patience: int) -> bool:
        """Early stopping: True if this epoch (numbered from 1) is the new best.

        The member stops when PPL has failed to improve for more than `patience` epochs
        (patience 0: at the first epoch that is not better), or fails on a non-finite PPL.
        """
        if not math.isfinite(ppl):
            self.status, self.error = "failed", f"diverged: non-finite loss or PPL at epoch {epoch}"
            return False
        if ppl < self.best_ppl:
            self.best_ppl, self.best_epoch, self.bad_epochs = ppl, epoch, 0
            return True
        self.bad_epochs += 1
        if self.bad_epochs > patience:
            self.status = "completed"
        return False


class Population:
    """K configurations of one shape, trained epoch by epoch as one model."""

    def __init__(self, configs: list[UniversalConfig], corpus: Corpus,
                 device: str | torch.device = "cpu", cuda_graphs: bool | None = None,
                 compile: bool = False, precision: str = "fp32", moe_dispatch: str = "auto"):
        if not configs:
            raise ConfigError("population: needs at least one configuration")
        shapes = {c.shape_key for c in configs}
        if len(shapes) > 1:
            raise ConfigError("population: members must share dim, num_layers, num_heads, "
                              "exits, experts, batch_size, seq_len, max_epochs and teacher")
        self.configs = [c.validate() for c in configs]
        self.device = torch.device(device)
        check_fits(configs[0], corpus.vocab_size, len(configs), self.device)  # before allocating
        self.corpus = corpus.to(self.device)
        self.shape = ModelShape.of(configs[0], corpus.vocab_size)
        self.model = EarlyExitLM(self.shape, [c.seed for c in configs],
                                 moe_dispatch).to(self.device)
        teacher = load_teacher(configs[0].teacher, self.device, corpus.vocab_size, corpus.vocab)
        self.objective = Objective(self.configs, self.device, teacher, precision)
        self.optimizer = PopulationAdamW(self.model, self.configs)
        # On a GPU a seed-scale epoch is thousands of tiny kernel launches: capture the whole
        # epoch once as a CUDA graph and replay it (one launch per epoch). The graph reads
        # its per-epoch inputs from these fixed buffers.
        # The sparse MoE's shapes follow the routing, which a graph cannot: it runs eager.
        if cuda_graphs is None:
            tokens = configs[0].batch_size * configs[0].seq_len
            cuda_graphs = self.device.type == "cuda" and not self.model.uses_sparse_moe(tokens)
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple[int, ...], torch.cuda.CUDAGraph] = {}
        # Compiling fuses the loss's element-wise work (norms, rotary, GLU, cross-entropy).
        self._loss = torch.compile(self.objective.loss) if compile else self.objective.loss
        self._weights = self.objective.layer_weights(0)
        self._active = torch.ones(len(configs), device=self.device)
        self._total = torch.zeros(len(configs), device=self.device)
        self.members = [MemberRecord() for _ in configs]
        # Epochs trained so far, which is also the next epoch's index counted from 0: the
        # alpha schedule's argument, as in the framework. Rows and results number it from 1.
        self.epoch = 0
        self.max_epochs = configs[0].max_epochs

    @property
    def finished(self) -> bool:
        return all(m.status != "running" for m in self.members)

    def train_epoch(self) -> torch.Tensor:
        """One pass over the training batches; returns the mean loss per member [K]."""
        weights = self.objective.layer_weights(self.epoch)
        layers = tuple(active_layers(weights))
        self._weights.copy_(weights)
        self._active.copy_(torch.tensor([m.status == "running" for m in self.members]))
        if not self.cuda_graphs:
            self._epoch_body(layers)
        else:
            if layers not in self._graphs:
                self._graphs[layers] = self._capture(layers)
            self._graphs[layers].replay()
        return self._total / len(self.corpus.train_x)

    def train_step(self, x: torch.Tensor, y: torch.Tensor,
                   layers: tuple[int, ...]) -> torch.Tensor:
        """One optimiser step on batch (x, y) with this epoch's weights; loss per member [K]."""
        loss = self._loss(self.model, x, y, self._weights, list(layers))
        loss.sum().backward()  # members share no parameters: one backward serves all
        self.optimizer.clip_()
        self.optimizer.step(self._active)
        return loss.detach()

    def _epoch_body(self, layers: tuple[int, ...]) -> None:
        self._total.zero_()
        for x, y in zip(self.corpus.train_x, self.corpus.train_y):
            self._total += self.train_step(x, y, layers)

    def _capture(self, layers: tuple[int, ...]) -> torch.cuda.CUDAGraph:
        """Record one epoch as a CUDA graph (PyTorch's whole-network capture recipe).

        The warm-up step that capture needs would train the model, so the state is saved
        before it and restored after: capturing leaves the trajectory exactly as eager.
        """
        saved = [t.clone() for t in self._state_tensors()]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.train_step(self.corpus.train_x[0], self.corpus.train_y[0], layers)
        torch.cuda.current_stream().wait_stream(stream)
        for tensor, copy in zip(self._state_tensors(), saved):
            tensor.copy_(copy)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._epoch_body(layers)
        return graph

    def _state_tensors(self) -> list[torch.Tensor]:
        o = self.optimizer
        return [p.data for p in o.params] + o.m + o.v + [o.steps]

    def run_epoch(self) -> list[dict[str, Any]]:
        """Train and evaluate one epoch; returns one row per member still running."""
        start = time.perf_counter()
        self.model.train()
        train_loss = self.train_epoch().tolist()
        self.model.eval()
        stats = self.objective.evaluate(self.model, zip(self.corpus.val_x, self.corpus.val_y))
        # Python numbers from here: indexing K tensors member by member costs more than this.
        stats = {k: v.cpu().tolist() for k, v in stats.items()}
        seconds = time.perf_counter() - start
        rows = []
        number = self.epoch + 1  # what users see: epochs counted from 1
        for k, (config, member) in enumerate(zip(self.configs, self.members)):
            if member.status != "running":
                continue
            ppl = stats["ppl"][k]
            member.epochs_run += 1
            member.train_seconds += seconds
            rows.append({"member": k, "epoch": number, "train_loss": train_loss[k],
                         "val_ppl": ppl, "acc": stats["acc"][k],
                         "shallow_ratio": stats["shallow_ratio"][k],
                         "compute_cost": stats["compute_cost"][k],
                         "alpha": config.get_layer_weights(self.epoch)[config.exits[0]],
                         "epoch_seconds": seconds})
            if not math.isfinite(train_loss[k]):
                ppl = math.nan
            if member.observe(number, ppl, config.patience):
                member.best = _best_metrics(stats, k)
        self.epoch += 1
        if self.epoch >= self.max_epochs:
            for member in self.members:
                if member.status == "running":
                    member.status = "completed"
        return rows

    def results(self) -> list[dict[str, Any]]:
        """One result row per member: its configuration, best-epoch metrics and provenance."""
        rows = []
        for k, (config, member) in enumerate(zip(self.configs, self.members)):
            row = {**config.flat(), **EMPTY_METRICS, **member.best}
            row.update(member=k, cohort_size=len(self.configs), epochs_run=member.epochs_run,
                       train_seconds=member.train_seconds, status=member.status,
                       error=member.error, ufw_version=ufw.__version__,
                       torch_version=torch.__version__, device=device_name(self.device),
                       dataset=self.corpus.name)
            if member.best_epoch >= 1:
                row.update(best_ppl=member.best_ppl, best_epoch=member.best_epoch)
            rows.append(row)
        return rows

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training exactly where it stopped."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "members": [vars(m).copy() for m in self.members], "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.members = [MemberRecord(**m) for m in state["members"]]
        self.epoch = state["epoch"]

    def save_member(self, k: int, path: str) -> None:
        """Save member k as a standalone model (usable as a distillation teacher).

        A safetensors file (ufw.tensorfile): loading it never runs code from it.
        """
        tensorfile.save(path, {"config": self.configs[k].to_dict(),
                               "vocab_size": self.corpus.vocab_size, "vocab": self.corpus.vocab,
                               "state": self.model.member_state(k)}, tensorfile.MODEL)


def _best_metrics(stats: dict[str, list], k: int) -> dict[str, Any]:
    """Member k's metrics of this epoch (`stats`: Objective.evaluate's, as lists)."""
    curve = [{"threshold": t, "ppl": stats["curve_ppl"][k][g],
              "compute_cost": stats["curve_compute_cost"][k][g],
              "shallow_ratio": stats["curve_shallow_ratio"][k][g]}
             for g, t in enumerate(THRESHOLD_GRID)]
    return {"acc": stats["acc"][k], "shallow_ratio": stats["shallow_ratio"][k],
            "compute_cost": stats["compute_cost"][k],
            "expert_ffns_per_token": stats["expert_ffns_per_token"][k],
            "exit_shares": json.dumps([round(s, 6) for s in stats["exit_shares"][k]]),
            "threshold_curve": json.dumps(curve)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def load_teacher(path: str, device: torch.device, vocab_size: int,
                 vocab: list[str] | None = None) -> EarlyExitLM | None:
    """A saved ufw model (see `Population.save_member`) as a frozen teacher; None for 'self'.

    Its vocabulary must be the student's: the same size, and the same symbols where known.
    """
    if path == "self":
        return None
    saved = tensorfile.load(path, tensorfile.MODEL, what="teacher")
    try:
        # The teacher's own teacher is history, not needed (nor, perhaps, still on disk).
        config = UniversalConfig.from_dict({**saved["config"], "teacher": "self"})
        saved_vocab_size = int(saved["vocab_size"])
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"teacher {path}: not a complete ufw model ({e})") from None
    if saved_vocab_size != vocab_size or (vocab and saved.get("vocab", vocab) != vocab):
        raise ConfigError(f"teacher: {path} was trained on another vocabulary "
                          f"({saved_vocab_size} symbols; this corpus has {vocab_size})")
    teacher = EarlyExitLM(ModelShape.of(config, vocab_size), [config.seed])
    try:
        with torch.no_grad():
            for name, p in teacher.named_member_params():
                p.copy_(saved["state"][name][None])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ConfigError(f"teacher {path}: its parameters do not match its configuration "
                          f"({_first_line(e)})") from None
    return teacher.to(device).eval().requires_grad_(False)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def members_that_fit(config: UniversalConfig, corpus: Corpus, device: str = "cuda",
                     memory_fraction: float = 1.0, precision: str = "fp32",
                     probe_members: int = 8, limit: int = 1024) -> int:
    """How many members like `config` fit in `memory_fraction` of the GPU's free memory.

    Measures the peak memory of one training step and one evaluation of a small population,
    then scales it: memory grows linearly with members (every tensor has a member axis).
    Keeps 30% headroom for CUDA graphs, the allocator's fragmentation and checkpoints.
    """
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    probe = Population([config.with_overrides({"seed": k}) for k in range(probe_members)],
                       corpus, device, cuda_graphs=False, precision=precision)
    layers = tuple(active_layers(probe.objective.layer_weights(0)))
    probe.train_step(probe.corpus.train_x[0], probe.corpus.train_y[0], layers)
    probe.objective.evaluate(probe.model, zip(probe.corpus.val_x, probe.corpus.val_y))
    per_member = (torch.cuda.max_memory_allocated(device) - base) / probe_members
    del probe
    torch.cuda.empty_cache()
    return max(1, min(limit, int(free * memory_fraction * 0.7 / per_member)))


def train(configs: list[UniversalConfig], corpus: Corpus, device: str = "cpu",
          on_epoch: Callable[[Population, list[dict]], None] | None = None,
          state: dict | None = None, precision: str = "fp32",
          compile: bool = False) -> list[dict[str, Any]]:
    """Train a population to the end; `on_epoch` sees each epoch's rows (report, checkpoint)."""
    population = Population(configs, corpus, device, compile=compile, precision=precision)
    if state is not None:
        population.load_state_dict(state)
    while not population.finished:
        rows = population.run_epoch()
        if on_epoch is not None:
            on_epoch(population, rows)
    return population.results()


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


def main(argv: list[str] | None = None) -> int:
    from ufw import cli, rerun

    parser = cli.parser("python -m ufw.train", "Train one configuration; print its JSON row "
                                               "(every column: docs/design.md).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a named preset: " + ", ".join(cli.preset_names()))
    source.add_argument("--config", help="a YAML file of config keys (docs/knobs.md)")
    source.add_argument("--from", dest="results", metavar="RESULTS",
                        help="re-train a row of a sweep (RESULTS: results/<sweep>), with "
                             "--config-id: its configuration on the sweep's data")
    parser.add_argument("--config-id", help="with --from: the row's config_id (or a prefix)")
    parser.add_argument("--seed", type=int, help="random seed (initialisation); with --from: "
                                                 "which seed of the row (default: its first)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    cli.speed_flags(parser)
    args = parser.parse_args(argv)
    if (args.results is None) != (args.config_id is None):
        parser.error("--from and --config-id go together")
    with cli.user_errors():
        device = cli.check_device(args.device)
        data, preset, again = None, args.preset, None
        if args.results is not None:
            again = rerun.rerun_of(args.results, args.config_id, args.seed)
            config = again.config.with_overrides(cli.parse_sets(args.set))
            data, preset = again.data, again.preset
            if data is None and all(getattr(args, k) is None for k in cli.DATA_KEYS):
                raise ConfigError(f"--from {args.results}: no sweep.json records its data; "
                                  f"give the data flags (the row says {again.row['dataset']})")
            for note in again.notes:
                print(f"note: {note}", file=sys.stderr)
        else:
            config = cli.config_from_args(args)
        corpus = cli.corpus_from_args(args, config, data)
        # Still a user error while training starts: a teacher of another vocabulary.
        row = train([config], corpus, device, on_epoch=print_progress,
                    precision=args.precision, compile=args.compile)[0]
    row["preset"] = preset
    if again is not None and again.row.get("best_ppl") and again.config.seed == again.row["seed"]:
        before = again.row["best_ppl"]
        print(f"note: best_ppl {row['best_ppl']:.6f}, the row's {before:.6f} (relative "
              f"difference {abs(row['best_ppl'] - before) / before:.1e})", file=sys.stderr)
    print(json.dumps(json_row(row), allow_nan=False))
    return 0


def print_progress(population: Population, rows: list[dict[str, Any]]) -> None:
    """One line per epoch on stderr (stdout is the JSON row): a long run shows it is alive."""
    for row in rows:
        left = population.max_epochs - row["epoch"]
        member = f" member {row['member']}" if len(population.configs) > 1 else ""
        print(f"epoch {row['epoch']}/{population.max_epochs}{member}: train loss "
              f"{row['train_loss']:.4f}, val PPL {row['val_ppl']:.3f}, "
              f"{row['epoch_seconds']:.1f} s/epoch, ETA {left * row['epoch_seconds']:.0f} s",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
