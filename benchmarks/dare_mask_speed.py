"""DARE mask generation speed: elements per second on one CPU thread.

Compares MergeLM's ``torch.bernoulli`` on a tensor filled with p (global RNG) with this project's
order-independent block mask (``model_merging_methods.dare.random_keep_mask``), full DARE on a float32 delta
(mask + multiply + rescale) and DARE of a bfloat16 fine-tuned tensor against a float32 base (upcast and
subtraction fused in, ``dare_delta``; MergeLM: upcast, subtract, then its DARE).

Example:
    python benchmarks/dare_mask_speed.py --numel 67108864 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_merging_methods.dare import dare_delta, mask_tensor, random_keep_mask  # noqa: E402


def _median_rate(fn: Callable[[], object], numel: int, repeats: int) -> float:
    fn()  # untimed: the compiled DARE kernels load (or compile) on first use
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return numel / statistics.median(times)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=1 << 26)
    parser.add_argument("--drop_rate", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num_threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    n, p = args.numel, args.drop_rate
    probabilities = torch.full((n,), p)
    delta = torch.randn(n)
    base32, finetuned16 = torch.randn(n), torch.randn(n).bfloat16()
    rates = {
        "torch.bernoulli (MergeLM)": _median_rate(lambda: torch.bernoulli(probabilities), n, args.repeats),
        "MergeLM DARE: bernoulli, multiply, divide": _median_rate(
            lambda: torch.div(delta * (1 - torch.bernoulli(probabilities)), 1 - p, out=delta), n, args.repeats
        ),
        "torch.rand < p": _median_rate(lambda: torch.rand(n) < p, n, args.repeats),
        "random_keep_mask (ours)": _median_rate(
            lambda: random_keep_mask(n, p, seed=0, model_index=0, name="w"), n, args.repeats
        ),
        "full DARE on a float32 delta (ours)": _median_rate(
            lambda: mask_tensor(delta, drop_rate=p, use_weight_rescale=True, mask_strategy="random", seed=0,
                                model_index=0, name="w"), n, args.repeats
        ),
        "MergeLM: bf16 fine-tuned - float32 base, then DARE": _median_rate(
            lambda: torch.div((finetuned16.float() - base32) * (1 - torch.bernoulli(probabilities)), 1 - p), n,
            args.repeats
        ),
        "dare_delta: bf16 fine-tuned - float32 base, DARE (ours)": _median_rate(
            lambda: dare_delta(finetuned16, base32, drop_rate=p, use_weight_rescale=True, seed=0, model_index=0,
                               name="w"), n, args.repeats
        ),
    }
    base = rates["torch.bernoulli (MergeLM)"]
    print(f"{n:,} elements, p={p}, {args.num_threads} thread(s), torch {torch.__version__}, {platform.processor()}")
    print("| generator | M elements/s | vs torch.bernoulli |")
    print("|---|---:|---:|")
    for label, rate in rates.items():
        print(f"| {label} | {rate / 1e6:.0f} | {rate / base:.2f}x |")
    return rates


if __name__ == "__main__":
    main()
