"""One attention layer's forward + backward on CPU at SmolLM2's shape, per kernel and dtype, in one process.

    python bench/attention.py [--batch 4] [--length 470] [--reps 5]

Why: a bf16 SFT step of SmolLM2 spends about a quarter of its time in PyTorch's CPU flash attention
(docs/pretrained-models.md), which bounds what bf16 autocast gains over float32. This shows whether another
kernel would do better: SDPA's flash and math backends, with a causal flag or an explicit boolean mask (what
a padded batch sends), and the eager formula transformers uses (two matmuls and a softmax, the softmax in
float32 as transformers does it, or in the input dtype). Shape: 9 query heads of 64 (SmolLM2-135M), 470
tokens (an expert episode with the system prompt). Each row: milliseconds per call (the first, warm-up, left
out), its ratio to flash float32 with the causal flag, and the layer's attention FLOPs per second (forward
4 x B x H x L^2 x D, backward 2.5x that: the full square, as the kernels without block skipping compute it).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, HEAD_DIM = 9, 64


def sdpa(backend: SDPBackend, causal: bool):
    def attend(q, k, v, mask):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal)
    return attend


def eager(softmax_dtype: torch.dtype | None):
    def attend(q, k, v, mask):
        scores = torch.matmul(q, k.transpose(-1, -2)) * HEAD_DIM ** -0.5
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1, dtype=softmax_dtype)
        return torch.matmul(weights.to(q.dtype), v)
    return attend


KERNELS = {
    "flash, causal": sdpa(SDPBackend.FLASH_ATTENTION, True),
    "flash, mask": sdpa(SDPBackend.FLASH_ATTENTION, False),
    "math, causal": sdpa(SDPBackend.MATH, True),
    "math, mask": sdpa(SDPBackend.MATH, False),
    "eager, float32 softmax": eager(torch.float32),
    "eager, input-dtype softmax": eager(None),
}


def seconds_per_call(attend, dtype: torch.dtype, batch: int, length: int, reps: int) -> float:
    q, k, v = (torch.randn(batch, HEADS, length, HEAD_DIM, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.ones(batch, 1, length, length, dtype=torch.bool).tril()
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        attend(q, k, v, mask).sum().backward()
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=470)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    flops = 4 * args.batch * HEADS * args.length ** 2 * HEAD_DIM * 3.5
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{open('/proc/loadavg').read().split()[0]}")
    print(f"{'kernel':28} {'dtype':9} {'ms':>8} {'x flash fp32':>13} {'GFLOP/s':>8}")
    baseline = None
    for dtype in (torch.float32, torch.bfloat16):
        for name, attend in KERNELS.items():
            seconds = seconds_per_call(attend, dtype, args.batch, args.length, args.reps)
            baseline = baseline or seconds
            print(f"{name:28} {str(dtype).removeprefix('torch.'):9} {seconds * 1e3:8.1f} "
                  f"{baseline / seconds:13.2f} {flops / seconds / 1e9:8.1f}", flush=True)


if __name__ == "__main__":
    main()
