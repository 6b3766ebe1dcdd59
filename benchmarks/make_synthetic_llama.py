"""Generate a synthetic homologous Llama family for merge benchmarks: a random base and fine-tunes = base + noise.

Example:
    python benchmarks/make_synthetic_llama.py --size 271m --num_finetuned 2 --output_dir bench_runs/llama-271m

Weights are bfloat16 sharded safetensors (``model-0000k-of-0000N.safetensors`` + index); each fine-tune adds
``N(0, delta_std)`` (default 0.002) to every base tensor. Only ``config.json`` is written (no tokenizer).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

SIZES: dict[str, dict[str, int]] = {
    # 271.1M parameters (untied embeddings)
    "271m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=16),
    # 1.10B parameters (TinyLlama-1.1B shapes)
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4),
    # 6.74B parameters (Llama-2-7B shapes): about 13.5 GB per bfloat16 model
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    # 3.5M parameters, for smoke tests of the benchmark itself
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
}
VOCAB_SIZE = 32000


def llama_config(size: str) -> dict:
    """A ``LlamaForCausalLM`` config.json for one of ``SIZES``."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, "rope_theta": 10000.0, **SIZES[size],
    }


def llama_shapes(config: dict) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every Llama tensor in Hugging Face order."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    yield "model.embed_tokens.weight", (VOCAB_SIZE, hidden)
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        yield f"{prefix}.input_layernorm.weight", (hidden,)
        yield f"{prefix}.self_attn.q_proj.weight", (hidden, hidden)
        yield f"{prefix}.self_attn.k_proj.weight", (kv, hidden)
        yield f"{prefix}.self_attn.v_proj.weight", (kv, hidden)
        yield f"{prefix}.self_attn.o_proj.weight", (hidden, hidden)
        yield f"{prefix}.post_attention_layernorm.weight", (hidden,)
        yield f"{prefix}.mlp.gate_proj.weight", (inter, hidden)
        yield f"{prefix}.mlp.up_proj.weight", (inter, hidden)
        yield f"{prefix}.mlp.down_proj.weight", (hidden, inter)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (VOCAB_SIZE, hidden)


def _base_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape)
    return torch.randn(shape, generator=generator) * 0.02


def write_model(folder: Path, config: dict, tensors: Iterator[tuple[str, torch.Tensor]], shard_bytes: int) -> None:
    """Save bf16 tensors as sharded safetensors with an index, plus ``config.json`` (one shard in memory)."""
    folder.mkdir(parents=True, exist_ok=True)
    names: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        names.append(list(shard))
        save_file(shard, str(folder / f"part-{len(names)}.safetensors"), metadata={"format": "pt"})
        shard.clear()

    for name, tensor in tensors:
        if shard and size + tensor.nbytes > shard_bytes:
            flush()
            size = 0
        shard[name] = tensor
        size += tensor.nbytes
        total += tensor.nbytes
    flush()
    weight_map = {}
    for i, shard_names in enumerate(names):
        file_name = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        (folder / f"part-{i + 1}.safetensors").rename(folder / file_name)
        weight_map.update(dict.fromkeys(shard_names, file_name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def make_family(output_dir: Path, size: str, num_finetuned: int = 2, delta_std: float = 0.002,
                shard_bytes: int = 200 * 1024**2, seed: int = 0) -> list[Path]:
    """Write ``base/`` and ``ft1/ .. ftN/`` under ``output_dir``; returns their folders (base first)."""
    config = llama_config(size)
    shapes = list(llama_shapes(config))
    folders = [output_dir / "base"] + [output_dir / f"ft{i + 1}" for i in range(num_finetuned)]
    base_gen = torch.Generator().manual_seed(seed)

    def base_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, shape in shapes:
            yield name, _base_tensor(name, shape, base_gen).to(torch.bfloat16)

    write_model(folders[0], config, base_tensors(), shard_bytes)
    for i, folder in enumerate(folders[1:]):
        delta_gen = torch.Generator().manual_seed(seed + 1000 + i)
        base_gen.manual_seed(seed)

        def tuned(delta_gen: torch.Generator = delta_gen) -> Iterator[tuple[str, torch.Tensor]]:
            for name, shape in shapes:
                base = _base_tensor(name, shape, base_gen).to(torch.bfloat16).float()
                yield name, (base + torch.randn(shape, generator=delta_gen) * delta_std).to(torch.bfloat16)

        write_model(folder, config, tuned(), shard_bytes)
    numel = sum(torch.Size(s).numel() for _, s in shapes)
    logger.info("wrote a %s Llama family (%.1fM parameters) to %s", size, numel / 1e6, output_dir)
    return folders


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="271m")
    parser.add_argument("--num_finetuned", type=int, default=2)
    parser.add_argument("--delta_std", type=float, default=0.002)
    parser.add_argument("--shard_mb", type=int, default=200)
    parser.add_argument("--output_dir", required=True)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    return make_family(Path(args.output_dir), args.size, args.num_finetuned, args.delta_std,
                       args.shard_mb * 1024**2)


if __name__ == "__main__":
    main()
