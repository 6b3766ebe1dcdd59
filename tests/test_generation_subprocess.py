"""Generation jobs: one child process and one engine per model for all of its datasets (``run_jobs``).

vLLM is a fake module here whose engine reads each prompt as token ids (its own tokenizer encodes text prompts, as
vLLM does) and answers with those ids and their decoding, so a prompt tokenised by the wrong tokenizer, or an
output decoded by one that decodes differently, changes the text. Child processes run in this process
(``_run_child`` patched): each "child" starts with no engine, as a fresh process would, and the test counts them.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama_config

from evaluation import generation, generation_subprocess
from evaluation.generation import cut_at_stop, get_vllm_engine
from evaluation.generation_subprocess import generation_job, run_in_subprocess, run_jobs
from evaluation.generations_file import load_finished_generations
from evaluation.model_identity import decoding_key, group_by_model, weights_key

WORDS = [f"w{i:02d}" for i in range(60)]


def word_tokenizer(*, pad_token: str | None = None, bos_prefix: bool = False):
    """A 64-token word-level tokenizer (ids 0-3 special, then w00..w59); ``pad_token="[PAD]"`` adds id 64;
    ``bos_prefix`` encodes ``<s>`` before every text (same decoding, other token ids)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<extra>": 3, **{w: 4 + i for i, w in enumerate(WORDS)}}
    if pad_token == "[PAD]":
        vocab["[PAD]"] = 64
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    if bos_prefix:
        backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    kwargs = {"pad_token": pad_token} if pad_token else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   **kwargs)


def make_view(weights: Path, view: Path, tokenizer) -> str:
    """``view`` = hard links to ``weights``' files + its own tokenizer (what a merged model's task folder is)."""
    view.mkdir(parents=True)
    for item in weights.iterdir():
        if item.is_file() and not item.name.startswith(("tokenizer", "special_tokens")):
            os.link(item, view / item.name)
    tokenizer.save_pretrained(view)
    return str(view)


@pytest.fixture
def folders(tmp_path) -> dict[str, str]:
    """A model folder (placeholder weights) and views of it: ``plain`` (its tokenizer), ``bos`` (encodes
    differently, decodes alike), ``pad`` (another vocabulary: decodes differently); ``copy``: equal bytes, other
    files."""
    weights = tmp_path / "model"
    weights.mkdir()
    (weights / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    (weights / "model.safetensors").write_bytes(b"weights")
    word_tokenizer().save_pretrained(weights)
    shutil.copytree(weights, tmp_path / "copy")
    return {"model": str(weights), "plain": make_view(weights, tmp_path / "plain", word_tokenizer()),
            "bos": make_view(weights, tmp_path / "bos", word_tokenizer(bos_prefix=True)),
            "pad": make_view(weights, tmp_path / "pad", word_tokenizer(pad_token="[PAD]")),
            "copy": str(tmp_path / "copy")}


# --- which folders share a model --------------------------------------------------------------------------------


def test_task_folders_share_the_weights_and_a_copy_does_not(folders):
    keys = {name: weights_key(path) for name, path in folders.items()}
    assert keys["model"] == keys["plain"] == keys["bos"] == keys["pad"]  # hard links: the same files
    assert keys["copy"] != keys["model"]  # the same bytes, other files: never compared by content
    assert weights_key("org/hub-id") == ("path", "org/hub-id")


def test_a_tokenizer_that_encodes_differently_can_decode_alike(folders):
    assert word_tokenizer(bos_prefix=True).encode("w01") != word_tokenizer().encode("w01")
    assert decoding_key(folders["bos"]) == decoding_key(folders["plain"])
    assert decoding_key(folders["pad"]) != decoding_key(folders["plain"])  # an extra token ([PAD], special)


def test_grouping_follows_weights_and_for_vllm_decoding(folders):
    paths = [folders[n] for n in ("plain", "pad", "bos", "copy", "plain")]
    assert group_by_model(paths, same_decoding=True) == [[0, 2, 4], [1], [3]]
    assert group_by_model(paths, same_decoding=False) == [[0, 1, 2, 4], [3]]  # HF: each folder's own tokenizer


# --- vLLM: one child and one engine for every dataset of a model ---------------------------------------------------


class TokenFakeLLM:
    """Stands in for ``vllm.LLM``: text prompts are encoded by the engine folder's tokenizer (vLLM adds special
    tokens), token-id prompts are taken as they are; the answer is the ids and their decoding, then ``|``."""

    def __init__(self, owner, **kwargs):
        from transformers import AutoTokenizer

        self.owner, self.kwargs, self.calls = owner, kwargs, []
        self.tokenizer = AutoTokenizer.from_pretrained(kwargs["model"])
        owner.engines.append(self)

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append(list(prompts))
        self.owner.calls += 1
        if self.owner.calls == self.owner.fail_on_call:
            raise RuntimeError(f"fake vLLM failure in call {self.owner.calls}")
        stop = params.kwargs["stop"] or []
        outputs = []
        for prompt in prompts:
            ids = prompt["prompt_token_ids"] if isinstance(prompt, dict) else self.tokenizer.encode(prompt)
            text = f"{ids} {self.tokenizer.decode(ids[-2:])}|end"
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(text=cut_at_stop(text, stop))]))
        return outputs


@pytest.fixture
def token_vllm(monkeypatch):
    """A fake ``vllm`` module (:class:`TokenFakeLLM`), CUDA reported available, and child processes run here:
    ``state.children`` counts them, ``state.engines`` holds every engine built, ``state.fail_on_call`` makes the
    n-th ``generate`` call (over all engines) raise, so that child exits with status 1."""
    state = SimpleNamespace(engines=[], children=0, calls=0, fail_on_call=None)
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM = lambda **kwargs: TokenFakeLLM(state, **kwargs)
    module.SamplingParams = lambda **kwargs: SimpleNamespace(kwargs=kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(generation, "_VLLM_ENGINE", None)
    monkeypatch.setattr("common.logging_setup.setup_logging", lambda *a, **k: None)

    def run_child(command, *, cwd, env, timeout_s):
        state.children += 1
        generation._VLLM_ENGINE = None  # a fresh process holds no engine
        try:
            return generation_subprocess.main(command[command.index("--request"):])
        except RuntimeError:
            return 1
        finally:
            generation._VLLM_ENGINE = None

    monkeypatch.setattr(generation_subprocess, "_run_child", run_child)
    return state


def _job(tmp_path, name: str, model_path: str, count: int = 3, chunk: int = 2) -> dict:
    examples = [{"idx": i, "prompt": f"w{i:02d} w1{i} w2{i}"} for i in range(count)]
    return generation_job(examples, tmp_path / "generations" / f"{name}.jsonl", id_field="idx",
                          settings={"backend": "vllm"}, model_path=model_path, backend="vllm", max_tokens=8,
                          stop=["|"], vllm_chunk_size=chunk, progress=False)


def _completions(records) -> list[str]:
    return [r["completion"] for r in records]


def test_three_datasets_of_one_model_take_one_child_and_one_engine(folders, token_vllm, tmp_path):
    jobs = [_job(tmp_path / "batch", "gsm8k", folders["plain"]), _job(tmp_path / "batch", "MATH", folders["bos"]),
            _job(tmp_path / "batch", "alpaca_eval", folders["plain"], count=2)]
    batch = run_jobs(jobs, isolate=True)
    assert token_vllm.children == 1 and len(token_vllm.engines) == 1
    engine = token_vllm.engines[0]
    assert engine.kwargs["model"] == folders["plain"]
    # the bos folder's prompts reach the engine as its own tokenizer's ids (with <s>), the others as texts
    assert [type(p) for call in engine.calls for p in call] == [str] * 3 + [dict] * 3 + [str] * 2
    assert engine.calls[2][0] == {"prompt_token_ids": [1, 4, 14, 24]}
    # the same texts as one process and one engine per dataset, the way it was done before
    token_vllm.engines.clear()
    single = [run_in_subprocess(job["examples"], tmp_path / "single" / Path(job["generations_path"]).name,
                                id_field="idx", settings=job["settings"], **job["generate"]) for job in jobs]
    assert len(token_vllm.engines) == 3 and token_vllm.children == 4
    assert [_completions(r) for r in batch] == [_completions(r) for r in single]
    assert _completions(batch[1])[0].startswith("[1, 4, 14, 24] ") and _completions(batch[0])[0].startswith("[4,")


def test_other_weights_or_another_decoding_get_their_own_process(folders, token_vllm, tmp_path):
    jobs = [_job(tmp_path, name, folders[name], count=1) for name in ("plain", "pad", "copy", "bos")]
    run_jobs(jobs, isolate=True)
    assert token_vllm.children == 3 and [e.kwargs["model"] for e in token_vllm.engines] == [
        folders["plain"], folders["pad"], folders["copy"]]  # bos joined the plain folder's engine
    generation._VLLM_ENGINE = None
    get_vllm_engine(folders["plain"])
    assert get_vllm_engine(folders["bos"]) is token_vllm.engines[-1]
    for other in ("pad", "copy"):
        with pytest.raises(ValueError, match="other weights, a tokenizer that decodes differently"):
            get_vllm_engine(folders[other])


def test_a_killed_batch_resumes_each_dataset_where_it_stopped(folders, token_vllm, tmp_path):
    jobs = [_job(tmp_path, "gsm8k", folders["plain"]), _job(tmp_path, "MATH", folders["bos"]),
            _job(tmp_path, "mbpp", folders["plain"])]
    token_vllm.fail_on_call = 4  # gsm8k: calls 1-2 (chunks of 2 + 1), MATH: call 3 done, call 4 killed
    with pytest.raises(RuntimeError, match="exited with status 1"):
        run_jobs(jobs, isolate=True)
    kept = [sorted(load_finished_generations(job["generations_path"], id_field="idx")[0]) for job in jobs]
    assert kept == [[0, 1, 2], [0, 1], []]  # a kill loses at most the running chunk
    token_vllm.fail_on_call, token_vllm.calls = None, 0
    resumed = run_jobs(jobs, isolate=True)
    assert token_vllm.children == 2 and len(token_vllm.engines) == 2
    # the finished gsm8k file is read back (not sent to the child); MATH continues at example 2, and its folder
    # (the first left) now starts the engine, so the plain folder's mbpp prompts go as token ids
    engine = token_vllm.engines[1]
    assert engine.kwargs["model"] == folders["bos"] and engine.calls[0] == ["w02 w12 w22"]
    assert [len(call) for call in engine.calls] == [1, 2, 1] and isinstance(engine.calls[1][0], dict)
    for job, records in zip(jobs, resumed, strict=True):
        lines = Path(job["generations_path"]).read_text(encoding="utf-8").splitlines()
        assert sorted(json.loads(line)["idx"] for line in lines) == [0, 1, 2]  # each id once
        assert [r["idx"] for r in records] == [0, 1, 2]
        single = run_in_subprocess(job["examples"], tmp_path / "single" / Path(job["generations_path"]).name,
                                   id_field="idx", settings=job["settings"], **job["generate"])
        assert _completions(records) == _completions(single)


# --- Hugging Face: the weights loaded once for the task folders, each with its own tokenizer ------------------------


@pytest.fixture
def tiny_views(tmp_path) -> dict[str, str]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(bos_token_id=1, eos_token_id=2, pad_token_id=None)).eval()
    weights = tmp_path / "model"
    model.save_pretrained(weights)
    word_tokenizer().save_pretrained(weights)
    return {"plain": make_view(weights, tmp_path / "plain", word_tokenizer()),
            "bos": make_view(weights, tmp_path / "bos", word_tokenizer(bos_prefix=True, pad_token="<extra>"))}


def test_hf_loads_the_weights_once_and_keeps_each_folder_s_tokenizer(tiny_views, tmp_path, monkeypatch):
    from evaluation import model_loading

    loads = []
    real_load = model_loading.load_causal_lm_for_generation
    monkeypatch.setattr(model_loading, "load_causal_lm_for_generation",
                        lambda path, **kwargs: loads.append(path) or real_load(path, **kwargs))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    kwargs = dict(backend="hf", max_tokens=4, device="cpu", progress=False, batch_size=2)
    prompts = ["w01 w02 w03", "w10", "w20 w21 w22 w23"]
    examples = [{"idx": i, "prompt": p} for i, p in enumerate(prompts)]
    jobs = [generation_job(examples, tmp_path / f"{name}.jsonl", id_field="idx", model_path=path, **kwargs)
            for name, path in tiny_views.items()]
    generation.release_hf_model()
    try:
        batch = run_jobs(jobs, isolate=False)
        assert loads == [tiny_views["plain"]]  # the bos folder reused the loaded model
        separate = []
        for path in tiny_views.values():
            generation.release_hf_model()
            separate.append(generation.generate(prompts, model_path=path, **kwargs))
    finally:
        generation.release_hf_model()
    assert len(loads) == 3 and [_completions(r) for r in batch] == separate
