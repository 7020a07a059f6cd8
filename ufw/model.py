"""The early-exit character LM, written once for a whole population of K members.

Every parameter carries a leading member axis: member k of a population is an independent
model with its own initialisation, and the population runs as batched matrix products
(`torch.bmm`) instead of K separate models. K = 1 is a plain single model.

Architecture (docs/design.md, section The method): token embedding, `num_layers` post-norm blocks
RMSNorm(x + Attn(x)), RMSNorm(x + GLU-FFN(x)) with rotary causal attention, and ONE output
head shared by every exit, so the logits of layer i are head(h_i). No biases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ufw import moe


@dataclass(frozen=True)
class ModelShape:
    """What members of one population must share."""

    vocab_size: int
    dim: int = 64
    num_layers: int = 3
    num_heads: int = 4
    num_experts: int = 1  # 1: a dense GLU FFN; more: a top-k Mixture of Experts
    experts_top_k: int = 1
    learned_confidence: bool = False  # a confidence head per exit (sigmoid of a linear map)
    exits: tuple[int, ...] = (1,)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def ffn_dim(self) -> int:
        """The GLU's hidden size (the framework's 4 x dim)."""
        return 4 * self.dim

    @classmethod
    def of(cls, config, vocab_size: int) -> ModelShape:
        return cls(vocab_size, config.dim, config.num_layers, config.num_heads,
                   config.num_experts, config.experts_top_k,
                   config.confidence_method == "learned", tuple(config.exits))


def _trunc_normal(shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    """`nn.init.trunc_normal_` with PyTorch's default bounds a=-2, b=2, as the framework draws
    its weights. The bounds are absolute, not in standard deviations: at the std used here
    (1/sqrt(dim), 0.02) they lie 16 to 100 stds out, so the draw is in effect an untruncated
    normal of exactly `std`. (Bounds of +-2 std would shrink every std to 0.88x.)"""
    t = torch.empty(shape)
    return nn.init.trunc_normal_(t, std=std, generator=gen)


def init_member(shape: ModelShape, seed: int) -> dict[str, torch.Tensor]:
    """One member's parameters, drawn on the CPU from its own seed in a fixed order.

    Drawing per member (not per population) is what makes member k of a population start
    exactly where a single run with the same seed starts.
    """
    gen = torch.Generator().manual_seed(seed)
    d, f, e = shape.dim, shape.ffn_dim, shape.num_experts
    std = 1 / math.sqrt(d)
    params = {"embed": _trunc_normal((shape.vocab_size, d), 0.02, gen)}
    for i in range(1, shape.num_layers + 1):
        params[f"{i}.wqkv"] = _trunc_normal((d, 3 * d), std, gen)
        params[f"{i}.wo"] = _trunc_normal((d, d), std, gen)
        params[f"{i}.norm1"] = torch.ones(d)
        experts = (e,) if e > 1 else ()
        params[f"{i}.w_gate"] = _trunc_normal((*experts, d, f), std, gen)
        params[f"{i}.w_up"] = _trunc_normal((*experts, d, f), std, gen)
        params[f"{i}.w_down"] = _trunc_normal((*experts, f, d), std, gen)
        if e > 1:
            params[f"{i}.router"] = _trunc_normal((d, e), std, gen)
        params[f"{i}.norm2"] = torch.ones(d)
    params["head"] = _trunc_normal((d, shape.vocab_size), std, gen)
    if shape.learned_confidence:
        for x in shape.exits:
            params[f"conf{x}.w"] = _trunc_normal((d, 1), std, gen)
            params[f"conf{x}.b"] = torch.zeros(1)
    return params


def layer_of(param_name: str) -> int | None:
    """The block a parameter belongs to (for layer-wise LR), None for embedding/head."""
    head = param_name.split(".")[0]
    return int(head) if head.isdigit() else None


def is_confidence_head(param_name: str) -> bool:
    """A parameter of a learned confidence head (trained on the detached hidden state)."""
    return param_name.startswith("conf")


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale


def rotary_tables(seq_len: int, head_dim: int, device, base: float = 10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()  # [T, head_dim/2]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention written out: the function `F.scaled_dot_product_attention` computes
    (scores and softmax in fp32). Compiled, the mask and softmax fuse into one kernel."""
    T = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)).float() * (1 / math.sqrt(q.shape[-1]))
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return weights.to(v.dtype) @ v


# Up to this head size a compiled step runs `softmax_attention`, not SDPA's fused kernels:
# at the seed shape (head size 16, 64 tokens) it measured 1.79 ms forward + backward against
# 2.0-3.4 ms for SDPA's kernels on an H200; at head size 32 and 64 they win
# (bench/attention.py, bench/results/attention_cuda.json).
SOFTMAX_ATTENTION_MAX_HEAD_DIM = 16


def attention_kernel(head_dim: int, device: torch.device, compiled: bool) -> str:
    """Which attention a population runs: "softmax" (compiled, on a GPU, small heads) or
    "sdpa". Eager, the written-out softmax is 2.5x slower than SDPA (bench/attention.py)."""
    small = head_dim <= SOFTMAX_ATTENTION_MAX_HEAD_DIM
    return "softmax" if compiled and device.type == "cuda" and small else "sdpa"


class EarlyExitLM(nn.Module):
    """K members of the same shape; `forward` returns the hidden state after every block."""

    def __init__(self, shape: ModelShape, seeds: list[int], moe_dispatch: str = "dense",
                 attention: str = "sdpa"):
        super().__init__()
        self.shape = shape
        if attention not in ("sdpa", "softmax"):  # the same function, two kernels
            raise ValueError(f"attention: {attention!r}; allowed: sdpa, softmax")
        self.attention = attention
        # MoE: "dense" (every expert on every token: the reference), "sparse" (each token to
        # its top-k experts only; see ufw/moe.py for when it is faster).
        if moe_dispatch not in ("dense", "sparse"):
            raise ValueError(f"moe_dispatch: {moe_dispatch!r}; allowed: dense, sparse")
        self.moe_dispatch = moe_dispatch
        self.num_members = len(seeds)
        members = [init_member(shape, s) for s in seeds]
        self.params = nn.ParameterDict({
            name.replace(".", "_"): nn.Parameter(torch.stack([m[name] for m in members]))
            for name in members[0]
        })
        self.names = {name.replace(".", "_"): name for name in members[0]}
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    def cache_rotary(self, seq_len: int) -> None:
        """Keep the rotary tables for sequences up to seq_len, on the model's device.

        Computed in `forward`, a compiled step would recompute them for every element of q
        and k: inductor fuses arange, pow, cos and sin into the rotary kernel, which then took
        ~20% of a K = 256 bf16 epoch on an H200. The values are the same either way.
        """
        self.rope_cos, self.rope_sin = rotary_tables(seq_len, self.shape.head_dim,
                                                     self.p("embed").device)

    def p(self, name: str) -> torch.Tensor:
        return self.params[name.replace(".", "_")]

    def named_member_params(self):
        """(dotted name, parameter with leading member axis)."""
        return [(self.names[k], v) for k, v in self.params.items()]

    # --------------------------------------------------------------- blocks
    def _attention(self, h: torch.Tensor, i: int, rope) -> torch.Tensor:
        K, B, T, D = h.shape
        H = self.shape.num_heads
        qkv = torch.bmm(h.reshape(K, B * T, D), self.p(f"{i}.wqkv"))
        q, k, v = qkv.view(K * B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if self.attention == "softmax":
            out = softmax_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = out.transpose(1, 2).reshape(K, B * T, D)
        return torch.bmm(out, self.p(f"{i}.wo")).view(K, B, T, D)

    def _ffn(self, h: torch.Tensor, i: int):
        """GLU FFN; with experts, each token uses its top-k experts (others get gate 0).

        Returns the output and, for MoE, the Switch-style load-balancing loss per member.
        """
        K, B, T, D = h.shape
        x = h.reshape(K, B * T, D)
        if self.shape.num_experts == 1:
            a = F.silu(torch.bmm(x, self.p(f"{i}.w_gate"))) * torch.bmm(x, self.p(f"{i}.w_up"))
            return torch.bmm(a, self.p(f"{i}.w_down")).view(K, B, T, D), None
        gates, balance = self.expert_gates(x, i)
        weights = (self.p(f"{i}.w_gate"), self.p(f"{i}.w_up"), self.p(f"{i}.w_down"))
        if self.uses_sparse_moe():
            y = moe.sparse_experts(x, gates, self.shape.experts_top_k, *weights)
        else:
            y = moe.dense_experts(x, gates, *weights)
        return y.view(K, B, T, D), balance

    def uses_sparse_moe(self) -> bool:
        """Whether tokens go to their top-k experts only (ufw/moe.py), not to every expert."""
        return self.shape.num_experts > 1 and self.moe_dispatch == "sparse"

    def expert_gates(self, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k routing of tokens x [K, N, D] in block i: (gates [K, N, E], balance [K]).

        A token's gates are its router probabilities of its top-k experts, renormalised to sum
        to 1 when k > 1 (Mixtral), and exactly 0 for every other expert. With k = 1 the gate is
        the probability itself (Switch Transformer): renormalised it would be p / p = 1, the
        router would get no gradient from the task loss, and AdamW would turn the rounding
        noise left in its place into full-sized steps. The Switch Transformer load-balancing loss
        is E * sum_e f_e * P_e (f_e: share of token-to-expert assignments, P_e: mean router
        probability of expert e); it is 1.0 when the router or the assignments are uniform.
        """
        E, k = self.shape.num_experts, self.shape.experts_top_k
        probs = torch.softmax(torch.bmm(x, self.p(f"{i}.router")), dim=-1)  # [K, N, E]
        top_p, top_i = probs.topk(k, dim=-1)
        weights = top_p / top_p.sum(-1, keepdim=True) if k > 1 else top_p
        gates = torch.zeros_like(probs).scatter(-1, top_i, weights)
        routed = torch.zeros_like(probs).scatter(-1, top_i, 1.0 / k)  # share of assignments
        balance = E * (routed.mean(1) * probs.mean(1)).sum(-1)  # [K]
        return gates, balance

    def forward(self, x: torch.Tensor, upto: int | None = None):
        """x: [B, T] token ids, shared by every member. Returns ([h_1..h_upto], balance loss)."""
        T = x.shape[1]
        if len(self.rope_cos) >= T:
            rope = self.rope_cos[:T], self.rope_sin[:T]
        else:
            rope = rotary_tables(T, self.shape.head_dim, x.device)
        h = self.p("embed")[:, x]  # [K, B, T, D]
        hidden, balance = [], None
        for i in range(1, (upto or self.shape.num_layers) + 1):
            h = rms_norm(h + self._attention(h, i, rope), self.p(f"{i}.norm1")[:, None, None])
            ffn, bal = self._ffn(h, i)
            h = rms_norm(h + ffn, self.p(f"{i}.norm2")[:, None, None])
            hidden.append(h)
            if bal is not None:
                balance = bal if balance is None else balance + bal
        return hidden, balance

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The shared head: [K, B, T, D] -> [K, B*T, V]."""
        K, B, T, D = h.shape
        return torch.bmm(h.reshape(K, B * T, D), self.p("head"))

    def confidence_logit(self, h: torch.Tensor, exit_layer: int) -> torch.Tensor:
        """Learned confidence head on an exit's hidden state: [K, B*T] logits of 'correct'."""
        K, B, T, D = h.shape
        w, b = self.p(f"conf{exit_layer}.w"), self.p(f"conf{exit_layer}.b")
        return (torch.bmm(h.reshape(K, B * T, D), w) + b[:, None]).squeeze(-1)

    @torch.no_grad()
    def reset_members(self, slots: list[int], seeds: list[int]) -> None:
        """Members `slots`' parameters drawn afresh from `seeds`, as new models of those seeds
        start. Written in place (a captured CUDA graph holds the parameters' addresses), one
        copy per parameter for all the slots."""
        fresh = [init_member(self.shape, seed) for seed in seeds]
        index = torch.tensor(slots, device=self.p("embed").device)
        for name, p in self.named_member_params():
            p.index_copy_(0, index, torch.stack([f[name] for f in fresh]).to(p.device, p.dtype))

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's parameters alone (to save one model out of a population)."""
        return {name: p[k].detach().cpu().clone() for name, p in self.named_member_params()}
