"""The seed's straightforward loop: one plain nn.Module, torch.optim.AdamW, one run at a time.

An independent reference for ufw (tests/test_extensions.py checks that ufw with K = 1 reaches
the same best PPL and best epoch) and the "straightforward loop" baseline of the speed
benchmarks (bench/throughput.py). It implements only the Universal Training Framework of
docs/design.md (weighted exits, alpha schedule, layer-wise LR, max-softmax routing,
early stopping), none of ufw's extensions, and none of its population machinery.

The weights start from `ufw.model.init_member(shape, seed)`, copied into nn.Linear layers
(whose weight is [out, in], so transposed), so that both start from the same point.

    python bench/naive.py --preset asymmetric_best [--device cuda] [--set max_epochs=3 ...]
"""

from __future__ import annotations

import json
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ufw.config import ConfigError, UniversalConfig
from ufw.data import Corpus
from ufw.model import ModelShape, init_member


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions: rotate the pairs (i, i + head_dim/2) of every head by position angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    """Post-norm block: RMSNorm(x + Attn(x)), then RMSNorm(x + GLU-FFN(x)); no biases."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.norm1 = RMSNorm(dim)
        self.gate = nn.Linear(dim, 4 * dim, bias=False)
        self.up = nn.Linear(dim, 4 * dim, bias=False)
        self.down = nn.Linear(4 * dim, dim, bias=False)
        self.norm2 = RMSNorm(dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        H = self.num_heads
        q, k, v = self.qkv(x).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)  # [B, H, T, hd]
        attn = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v,
                                              is_causal=True)
        x = self.norm1(x + self.out(attn.transpose(1, 2).reshape(B, T, D)))
        return self.norm2(x + self.down(F.silu(self.gate(x)) * self.up(x)))


class NaiveLM(nn.Module):
    """Embedding, `num_layers` blocks, one head shared by every exit."""

    def __init__(self, vocab_size: int, dim: int, num_layers: int, num_heads: int):
        super().__init__()
        self.head_dim = dim // num_heads
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(Block(dim, num_heads) for _ in range(num_layers))
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Hidden state after every block: [h_1, ..., h_L], each [B, T, dim]."""
        positions = torch.arange(x.shape[1], device=x.device).float()
        inv_freq = 10000.0 ** (-torch.arange(0, self.head_dim, 2, device=x.device).float()
                               / self.head_dim)
        angles = positions[:, None] * inv_freq[None, :]
        cos, sin = angles.cos(), angles.sin()
        h, hidden = self.embed(x), []
        for block in self.blocks:
            h = block(h, cos, sin)
            hidden.append(h)
        return hidden

    @torch.no_grad()
    def load_ufw_init(self, params: dict[str, torch.Tensor]) -> None:
        """Copy ufw's initial parameters (x @ W layout) into nn.Linear's (W @ x layout)."""
        self.embed.weight.copy_(params["embed"])
        self.head.weight.copy_(params["head"].T)
        for i, block in enumerate(self.blocks, start=1):
            for mine, theirs in (("qkv", "wqkv"), ("out", "wo"), ("gate", "w_gate"),
                                 ("up", "w_up"), ("down", "w_down")):
                getattr(block, mine).weight.copy_(params[f"{i}.{theirs}"].T)
            block.norm1.scale.copy_(params[f"{i}.norm1"])
            block.norm2.scale.copy_(params[f"{i}.norm2"])


class NaiveTrainer:
    """One configuration, trained epoch by epoch the straightforward way."""

    def __init__(self, config: UniversalConfig, corpus: Corpus, device: str = "cpu"):
        c = config.validate()
        if (c.confidence_method != "max_softmax" or len(c.exits) > 1
                or c.distillation_alpha < 1 or c.num_experts > 1):
            raise ConfigError("the naive reference implements the seed's framework only: "
                             "no confidence methods, multiple exits, distillation or experts")
        self.config = c
        self.device = torch.device(device)
        self.corpus = corpus.to(self.device)
        shape = ModelShape(corpus.vocab_size, c.dim, c.num_layers, c.num_heads)
        self.model = NaiveLM(corpus.vocab_size, c.dim, c.num_layers, c.num_heads)
        self.model.load_ufw_init(init_member(shape, c.seed))
        self.model.to(self.device)
        groups = [{"params": [*self.model.embed.parameters(), *self.model.head.parameters()],
                   "lr": c.lr}]
        groups += [{"params": list(block.parameters()), "lr": c.lr * c.lr_scale(i)}
                   for i, block in enumerate(self.model.blocks, start=1)]
        self.optimizer = torch.optim.AdamW(groups, lr=c.lr, weight_decay=c.weight_decay)
        self.threshold = c.thresholds[0]
        self.epoch = 0

    def loss(self, x: torch.Tensor, y: torch.Tensor, weights: dict[int, float]) -> torch.Tensor:
        """sum_i w_i * CE(head(h_i), y) over the layers of weight > 0."""
        hidden = self.model(x)
        loss = torch.zeros((), device=self.device)
        for layer, w in weights.items():
            if w > 0:
                logits = self.model.head(hidden[layer - 1])
                loss = loss + w * F.cross_entropy(logits.flatten(0, 1), y.flatten())
        return loss

    def train_epoch(self) -> float:
        self.model.train()
        weights = self.config.get_layer_weights(self.epoch, self.config.max_epochs)
        total = 0.0
        for x, y in zip(self.corpus.train_x, self.corpus.train_y):
            loss = self.loss(x, y, weights)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.config.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            self.optimizer.step()
            total += loss.item()
        return total / len(self.corpus.train_x)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Routed validation metrics: a token whose exit max-softmax >= threshold exits early."""
        self.model.eval()
        exit_layer, L = self.config.exits[0], self.config.num_layers
        ce_sum, right, shallow, tokens = 0.0, 0, 0, 0
        for x, y in zip(self.corpus.val_x, self.corpus.val_y):
            hidden = self.model(x)
            shallow_logits = self.model.head(hidden[exit_layer - 1]).flatten(0, 1).float()
            deep_logits = self.model.head(hidden[-1]).flatten(0, 1).float()
            confident = shallow_logits.softmax(-1).max(-1).values >= self.threshold
            if self.threshold == 0:  # 0 disables routing
                confident = torch.zeros_like(confident)
            logits = torch.where(confident[:, None], shallow_logits, deep_logits)
            ce_sum += F.cross_entropy(logits, y.flatten(), reduction="sum").item()
            right += (logits.argmax(-1) == y.flatten()).sum().item()
            shallow += confident.sum().item()
            tokens += y.numel()
        deep = tokens - shallow
        return {"ppl": math.exp(ce_sum / tokens), "acc": right / tokens,
                "shallow_ratio": shallow / tokens,
                "compute_cost": (shallow * exit_layer + deep * L) / (tokens * L)}

    def run_epoch(self) -> dict[str, float]:
        train_loss = self.train_epoch()
        stats = self.evaluate()
        self.epoch += 1
        return {"train_loss": train_loss, **stats}


def train_naive(config: UniversalConfig, corpus: Corpus, device: str = "cpu") -> dict[str, float]:
    """Train with early stopping; best_ppl, best_epoch, epochs_run and seconds_per_epoch."""
    trainer = NaiveTrainer(config, corpus, device)
    best_ppl, best_epoch, bad_epochs, best = math.inf, 0, 0, {}
    start = time.perf_counter()
    for epoch in range(config.max_epochs):
        stats = trainer.run_epoch()
        if not math.isfinite(stats["ppl"]):
            break
        if stats["ppl"] < best_ppl:
            best_ppl, best_epoch, bad_epochs, best = stats["ppl"], epoch + 1, 0, stats
        else:
            bad_epochs += 1
            if bad_epochs > config.patience:
                break
    seconds = time.perf_counter() - start
    return {"best_ppl": best_ppl, "best_epoch": best_epoch, "epochs_run": trainer.epoch,
            "seconds_per_epoch": seconds / max(1, trainer.epoch),
            **{k: best[k] for k in ("acc", "shallow_ratio", "compute_cost") if k in best}}


def main(argv: list[str] | None = None) -> None:
    from ufw import cli

    parser = cli.parser("python bench/naive.py", "Train one configuration the seed's way.")
    parser.add_argument("--preset", help="a named preset (default asymmetric_best)")
    parser.add_argument("--config", help="a YAML file of UniversalConfig fields")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if not args.config:
        args.preset = args.preset or "asymmetric_best"
    with cli.user_errors():
        config = cli.config_from_args(args)
        corpus = cli.corpus_from_args(args, config)
        print(json.dumps(train_naive(config, corpus, args.device)))


if __name__ == "__main__":
    main()
