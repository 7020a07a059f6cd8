"""Mixture-of-Experts feed-forward layers for a population: the dense reference and the
sparse dispatch whose arithmetic follows top-k.

Both compute, for every member k and token n, sum_e gates[k, n, e] * GLU_e(x[k, n]) with
the gates of `EarlyExitLM.expert_gates` (exactly 0 outside a token's top-k experts).
The dense path runs every expert on every token and weighs the results; its cost grows
with the number of experts. The sparse path sorts the (member, token, expert) assignments
into (member, expert) groups and runs each group's tokens through its own expert only:
in bf16 each of the GLU's three products is one grouped matrix product over all groups
(`torch._grouped_mm`), with static shapes and no host sync; in fp32 it loops over the
groups (the reference).

Which one runs: `Population` routes sparsely where the step can be captured as a CUDA graph
(bf16 on a GPU, `runs_grouped_kernel`), densely everywhere else. On an H200 at (512, 8, 8,
256), batch 32, 8 experts, one member, bf16, compiled (`bench/scale.py --moe`,
bench/results/scale_cuda_moe_top{1,2}_*.json), seconds per epoch: dense 5.16 (top-1) and
5.23 (top-2); sparse with CUDA graphs 3.83 and 4.19; sparse without them 6.76 and 5.88. At
the seed scale with 64 members and 4 experts (top-1) sparse took 6.18 s per epoch against
8.29 dense; at (256, 6, 8, 128) with 8 experts (top-2) 2.50 against 2.59.
"""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F


def dense_experts(x: torch.Tensor, gates: torch.Tensor, w_gate: torch.Tensor,
                  w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Every expert on every token: x [K, N, D], gates [K, N, E], weights [K, E, ., .]."""
    a = (F.silu(torch.einsum("knd,kedf->kenf", x, w_gate))
         * torch.einsum("knd,kedf->kenf", x, w_up))
    return torch.einsum("kenf,kefd,kne->knd", a, w_down, gates)


def sparse_experts(x: torch.Tensor, gates: torch.Tensor, top_k: int, w_gate: torch.Tensor,
                   w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Each expert on its own tokens only; the same result as `dense_experts`.

    The K * N * top_k (member, token, expert) assignments are sorted into K * E groups
    (member k's tokens for expert e), each padded to a multiple of `ALIGN` rows, so that each
    of the GLU's three products is one grouped product over all groups (`grouped_products`).
    Every shape depends on K, N, E and top_k only, never on the routing.
    """
    K, N, D = x.shape
    E = gates.shape[-1]
    groups, assignments = K * E, K * N * top_k
    device = x.device
    weight, expert = gates.topk(top_k, dim=-1)  # the k nonzero gates of every token
    group = (expert + E * torch.arange(K, device=device)[:, None, None]).flatten()
    order = group.argsort(stable=True)
    group, weight = group[order], weight.flatten()[order]
    token = torch.arange(K * N, device=device).repeat_interleave(top_k)[order]  # row of x
    counts = torch.zeros(groups, dtype=torch.long, device=device).index_add_(
        0, group, torch.ones_like(group))
    padded = (counts + ALIGN - 1) // ALIGN * ALIGN
    ends = padded.cumsum(0)
    total = assignments + groups * (ALIGN - 1)  # room for any routing
    ends[-1] = total  # the last group takes the spare rows (zeros), so none is left over
    # where each sorted assignment lives: its group's first padded row + its rank in the group
    row = (ends - padded)[group] + torch.arange(assignments, device=device) - (
        counts.cumsum(0) - counts)[group]
    dtype = _product_dtype(x)
    rows = x.new_zeros(total, D, dtype=dtype).index_copy(
        0, row, x.reshape(K * N, D)[token].to(dtype))
    a = (F.silu(grouped_products(rows, w_gate.flatten(0, 1), ends))
         * grouped_products(rows, w_up.flatten(0, 1), ends))
    y = grouped_products(a, w_down.flatten(0, 1), ends)[row].float() * weight[:, None]
    return x.new_zeros(K * N, D, dtype=torch.float32).index_add(0, token, y).view(K, N, D)


ALIGN = 16  # rows per group are padded to this: 16-byte aligned bf16 offsets for the kernel


def grouped_products(rows: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """rows [M, D] in consecutive groups ending at `ends` [G] (the last at M), w [G, D, F]:
    each group's rows times its own matrix.

    bf16 (with D and F multiples of 8): one grouped kernel for all groups (`torch._grouped_mm`,
    forward and backward), with no host sync. Otherwise a loop over the groups (their bounds
    read on the host): the fp32 reference.
    """
    w = w.to(rows.dtype)
    if runs_grouped_kernel(rows.dtype, rows.shape[-1], w.shape[-1]):
        return torch._grouped_mm(rows, w, offs=ends.to(torch.int32))
    bounds = [0, *ends.tolist()]
    return torch.cat([rows[s:e] @ w[g] for g, (s, e) in enumerate(pairwise(bounds))])


def runs_grouped_kernel(dtype: torch.dtype, dim: int, hidden: int) -> bool:
    """Whether `grouped_products` is one grouped kernel per product for these sizes: bf16,
    rows of whole 16-byte units. Then the sparse path has no host sync, and a CUDA graph can
    capture the whole training step."""
    return (dtype == torch.bfloat16 and dim % 8 == 0 and hidden % 8 == 0
            and hasattr(torch, "_grouped_mm"))


def _product_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert products run in: autocast's where it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
