"""Shared test fixtures: the offline data folder and tiny models built in the test (never downloaded)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_shared_data_dir() -> Path | None:
    """``$MERGELM_DATA_DIR`` or ``../shared/data`` next to the repository (where CI puts it)."""
    candidates = [os.environ.get("MERGELM_DATA_DIR"), REPO_ROOT.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate, "README.md").exists():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    path = find_shared_data_dir()
    if path is None:
        pytest.skip("offline data folder not found (set MERGELM_DATA_DIR or put it at ../shared/data)")
    return path


def tiny_bert_config(**overrides):
    from transformers import BertConfig

    kwargs = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99,
        max_position_embeddings=64, num_labels=2,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kwargs = dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=128, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_family(model_cls, config, num_finetuned: int = 2, delta_std: float = 0.01, seed: int = 0):
    """A base model and ``num_finetuned`` copies with seeded Gaussian deltas on every float parameter."""
    torch.manual_seed(seed)
    base = model_cls(copy.deepcopy(config)).eval()
    finetuned = []
    for i in range(num_finetuned):
        model = model_cls(copy.deepcopy(config)).eval()  # own config: resizing one must not touch the others
        model.load_state_dict(base.state_dict())
        generator = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * delta_std)
        finetuned.append(model)
    return base, finetuned


def save_llama_family(root, names, num_hidden_layers: int):
    """A tiny Llama base and ``len(names) - 1`` fine-tunes (``make_family``) saved as safetensors folders
    ``root/<name>``; returns ``root``."""
    from transformers import LlamaForCausalLM

    base, finetuned = make_family(LlamaForCausalLM, tiny_llama_config(num_hidden_layers=num_hidden_layers),
                                  num_finetuned=len(names) - 1)
    for name, model in zip(names, [base, *finetuned], strict=True):
        model.save_pretrained(root / name, safe_serialization=True)
    return root


def fill_model_paths(text: str, root, names) -> str:
    """A YAML configuration with each ``@name`` replaced by the folder ``root/name`` (dedented)."""
    import textwrap

    text = textwrap.dedent(text)
    for name in names:
        text = text.replace(f"@{name}", str(root / name))
    return text


def save_tiny_glue_workspace(root, shared_data_dir, tasks=("rte", "mrpc"), examples: int = 60) -> None:
    """``root/tiny-bert``: a tiny BERT with MiniLM's tokenizer (the "pretrained" encoder of a smoke run), and
    ``root/glue/<task>/{train,validation}.jsonl``: the first ``examples`` lines of the real GLUE copies."""
    import torch
    from transformers import BertModel

    from glue.encoder_models import load_tokenizer

    tokenizer = load_tokenizer("all-MiniLM-L6-v2")
    torch.manual_seed(0)
    BertModel(tiny_bert_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=128)).save_pretrained(
        root / "tiny-bert")
    tokenizer.save_pretrained(root / "tiny-bert")
    for task in tasks:
        (root / "glue" / task).mkdir(parents=True)
        for split in ("train", "validation"):
            lines = (shared_data_dir / "glue" / task / f"{split}.jsonl").read_text().splitlines()[:examples]
            (root / "glue" / task / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="session")
def tiny_bert_family():
    """Shared across the session: do not modify the models in place."""
    from transformers import BertForSequenceClassification

    return make_family(BertForSequenceClassification, tiny_bert_config())


@pytest.fixture(scope="session")
def tiny_llama_family():
    """Shared across the session: do not modify the models in place."""
    from transformers import LlamaForCausalLM

    return make_family(LlamaForCausalLM, tiny_llama_config())
