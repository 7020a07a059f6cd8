"""Causal attention at the population's shapes: each SDPA backend, and plain softmax attention
compiled by inductor, forward + backward, bf16.

    python bench/attention.py --device cuda [--sizes 64 256 512]

At the seed scale a K = 256 population's attention is 8192 x 4 heads of 64 x 64 scores with
head size 16, far from the long sequences the flash kernels are tuned for.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from common import device_label, save
from torch.nn.attention import SDPBackend, sdpa_kernel

# (dim, heads, seq_len, batch * members): the seed scale with K = 256, then K = 8 and 1 at the
# research sizes of bench/scale.py.
SIZES = {64: (64, 4, 64, 32 * 256), 256: (256, 8, 128, 32 * 8), 512: (512, 8, 256, 32)}


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    T = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = scores.float().masked_fill(~causal, float("-inf"))
    return (scores.softmax(-1).to(q.dtype) @ v)


def timed(fn, q, k, v, repeats: int) -> float:
    def step():
        out = fn(q, k, v)
        out.float().square().sum().backward()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    sdpa = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    results = []
    for size in args.sizes:
        dim, heads, T, batch = SIZES[size]
        shape = (batch, heads, T, dim // heads)
        q, k, v = (torch.randn(shape, device=args.device, dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        row = {"dim": dim, "heads": heads, "seq_len": T, "batch_x_members": batch}
        for name, backend in sdpa.items():
            def attend(q, k, v, backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            try:
                row[f"sdpa_{name}_ms"] = round(timed(attend, q, k, v, args.repeats), 3)
            except RuntimeError as error:  # a backend that does not take this shape
                row[f"sdpa_{name}_ms"] = f"unavailable: {str(error).splitlines()[0][:80]}"
        default = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        row["sdpa_default_ms"] = round(timed(default, q, k, v, args.repeats), 3)
        row["softmax_compiled_ms"] = round(
            timed(torch.compile(softmax_attention), q, k, v, args.repeats), 3)
        print(row, flush=True)
        results.append(row)
    save("attention_cuda.json", {"device": device_label(args.device), "results": results,
                                 "unit": "ms per forward + backward, bf16"})


if __name__ == "__main__":
    main()
