"""Text generation for the LLM benchmarks: vLLM and Hugging Face backends behind one function.

Decoding follows MergeLM (specification section 5): greedy at ``temperature=0``, ``top_p=1``, one completion per
prompt, a ``max_tokens`` budget, and stop strings that end generation and are cut from the returned text (which
never contains the prompt).

* ``backend="vllm"``: one ``vllm.LLM`` engine per process, started from the first model path asked for; the
  prompts of a benchmark go to ``LLM.generate`` in chunks of ``vllm_chunk_size`` (default 512), and each chunk's
  results are handed to ``on_result`` as soon as it finishes, so a killed run loses at most one chunk. Another
  folder with the same weight files and a tokenizer that decodes alike (a merged model's task folders,
  ``evaluation.model_identity``) is served by the same engine, its prompts tokenised with its own tokenizer.
  Asking for other weights in the same process is an error: MergeLM built one engine per task in one process,
  which needs ``num_models x tensor_parallel_size`` GPUs and fails with vLLM's "data parallel group is already
  initialized". Evaluate each model in its own process instead
  (``evaluation.generation_subprocess.run_jobs_in_subprocess``, or
  ``python -m evaluation.generation_subprocess --request request.json``). Where vLLM is not installed or no
  CUDA device is visible, ``vllm`` is an error (:func:`require_vllm`), never a silent fallback.
* ``backend="hf"``: ``model.generate`` in left-padded batches sorted by prompt length, stop strings checked on
  the decoded tail of every row; runs on CPU. The last model is kept loaded, also for another folder with the same
  weight files (each folder's own tokenizer is used).
* ``backend="auto"``: vLLM when it is importable and CUDA is available, else Hugging Face;
  :func:`backend_choice` says which and why, :func:`log_backend_choice` logs it.

Incremental saving and resume of a generations file: ``evaluation.generations_file.generate_to_jsonl``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from evaluation.model_identity import can_share_model, engine_prompts, weights_key

logger = logging.getLogger(__name__)

Backend = Literal["vllm", "hf", "auto"]
ResultCallback = Callable[[int, str], None]

# Prompts per vLLM ``LLM.generate`` call: large enough for vLLM to fill its batches, small enough that an
# interrupted run loses little (each finished chunk is handed to ``on_result`` and so written to disk).
DEFAULT_VLLM_CHUNK_SIZE = 512
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's own default

# One vLLM engine per process: (key, engine), the key's first item the model path it was started from. Never
# replaced once set (see the module docstring).
_VLLM_ENGINE: tuple[tuple[Any, ...], Any] | None = None
# The last Hugging Face model used by generate(): (key of its weights, model, {model path: tokenizer}), so GSM8K then
# MATH, and the task folders of one merged model, reuse it.
_HF_MODEL: tuple[tuple[Any, ...], Any, dict[str, Any]] | None = None


def _vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def vllm_unavailable_reason() -> str | None:
    """Why the vLLM backend cannot run here (``"vLLM is not installed"``, ``"no CUDA device is visible"``, or
    both), or None when it can. Checked without importing vLLM (which initialises CUDA on import)."""
    missing = []
    if not _vllm_installed():
        missing.append("vLLM is not installed")
    if not _cuda_available():
        missing.append("no CUDA device is visible")
    return " and ".join(missing) or None


def vllm_available() -> bool:
    """True when vLLM is importable and a CUDA device is visible (checked without importing vLLM)."""
    return vllm_unavailable_reason() is None


def require_vllm() -> None:
    """Raise when the vLLM backend cannot run here: what is missing, and how to fix it.

    Raises:
        ValueError: vLLM is not installed or no CUDA device is visible.
    """
    reason = vllm_unavailable_reason()
    if reason is not None:
        raise ValueError(
            f"backend 'vllm' cannot run here: {reason}; install it on a CUDA machine with "
            "`pip install -r requirements-gpu.txt` (and check that torch.cuda.is_available() is True), or pass "
            "--backend hf (Hugging Face transformers, CPU or GPU, several times slower) or --backend auto"
        )


def backend_choice(backend: str) -> tuple[Literal["vllm", "hf"], str]:
    """``(backend that runs, why)``: ``auto`` resolved on this machine, with the reason (``"vLLM is not
    installed"``, ``"no CUDA device is visible"``, ...); other names are checked and returned as requested."""
    if backend not in ("vllm", "hf", "auto"):
        raise ValueError(f"backend must be one of vllm, hf, auto, got {backend!r}")
    if backend != "auto":
        return backend, f"--backend {backend} requested"  # type: ignore[return-value]
    reason = vllm_unavailable_reason()
    if reason is None:
        return "vllm", "--backend auto: vLLM is installed and a CUDA device is visible"
    return "hf", f"--backend auto: {reason}, so Hugging Face transformers (several times slower than vLLM)"


def resolve_backend(backend: str) -> Literal["vllm", "hf"]:
    """``auto`` -> ``vllm`` when :func:`vllm_available`, else ``hf``; other names are checked and returned."""
    return backend_choice(backend)[0]


def log_backend_choice(backend: str, log: logging.Logger = logger) -> tuple[Literal["vllm", "hf"], str]:
    """Log which backend ``backend`` resolves to and why (a warning when ``auto`` falls back to Hugging Face on
    a machine with CUDA, where vLLM was most likely meant to be installed); returns :func:`backend_choice`."""
    chosen, reason = backend_choice(backend)
    if backend == "auto" and chosen == "hf" and _cuda_available():
        log.warning("generation backend: hf (%s); pip install -r requirements-gpu.txt for vLLM, or pass "
                    "--backend vllm to make it a requirement", reason)
    else:
        log.info("generation backend: %s (%s)", chosen, reason)
    return chosen, reason


def _check_decoding_args(max_tokens: int, temperature: float, top_p: float, batch_size: int) -> None:
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}; use 0 for greedy decoding")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def generate(
    prompts: Sequence[str],
    *,
    model_path: str,
    backend: Backend = "auto",
    max_tokens: int,
    stop: Sequence[str] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    device: str | None = None,
    gguf_file: str | None = None,
    vllm_chunk_size: int = DEFAULT_VLLM_CHUNK_SIZE,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    max_model_len: int | None = None,
    enforce_eager: bool = False,
    on_result: ResultCallback | None = None,
    progress: bool = True,
) -> list[str]:
    """Generate one completion per prompt with vLLM or Hugging Face transformers.

    Args:
        prompts: the full prompt texts (templates already applied).
        model_path: local folder, hub id, or ``.gguf`` file (see ``llms.model_resolution.resolve_model``).
        backend: ``vllm``, ``hf`` or ``auto`` (vLLM when importable and CUDA is available, else ``hf``).
        max_tokens: maximum number of new tokens per prompt (MergeLM: 1024 GSM8K, 2048 others).
        stop: stop strings; generation of a prompt ends at the first one, which is cut from the text.
        temperature: 0 = greedy (MergeLM); > 0 samples.
        top_p: nucleus sampling mass (MergeLM: 1); used only when sampling.
        batch_size: prompts per ``model.generate`` call (``hf`` only; vLLM schedules the prompts of a chunk itself).
        tensor_parallel_size: GPUs per vLLM engine (``vllm`` only).
        dtype: ``auto``, ``float32``, ``float16`` or ``bfloat16``; ``auto`` keeps the checkpoint's dtype on GPU
            (vLLM runs float32 checkpoints in half precision) and uses float32 on CPU.
        device: torch device for ``hf`` (default ``cuda`` when available, else ``cpu``).
        gguf_file: GGUF file name inside ``model_path`` (alternative to a ``.gguf`` ``model_path``).
        vllm_chunk_size: prompts per ``LLM.generate`` call (``vllm`` only); each chunk's results reach
            ``on_result`` as soon as the chunk finishes, so an interrupted run loses at most one chunk.
        gpu_memory_utilization: fraction of GPU memory the vLLM engine may use (vLLM's default 0.9).
        max_model_len: vLLM context length (None = the model's); lower it when the KV cache does not fit.
        enforce_eager: vLLM without CUDA graphs (less memory, slower).
        on_result: called as ``on_result(index, text)`` as each prompt finishes (``index`` into ``prompts``).
        progress: show a tqdm bar.
    Returns:
        The generated texts, in the order of ``prompts``, without the prompt and without stop strings.

    Raises:
        ValueError: ``backend="vllm"`` where vLLM is not installed or no CUDA device is visible
            (:func:`require_vllm`); ``auto`` falls back to ``hf`` there instead.
    """
    _check_decoding_args(max_tokens, temperature, top_p, batch_size)
    if vllm_chunk_size < 1:
        raise ValueError(f"vllm_chunk_size must be >= 1, got {vllm_chunk_size}")
    if not prompts:
        return []
    kwargs = dict(max_tokens=max_tokens, stop=stop, temperature=temperature, top_p=top_p, on_result=on_result)
    if resolve_backend(backend) == "vllm":
        if backend == "vllm":
            require_vllm()
        engine = get_vllm_engine(
            model_path, tensor_parallel_size=tensor_parallel_size, dtype=dtype, gguf_file=gguf_file,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, enforce_eager=enforce_eager,
        )
        model = os.path.join(model_path, gguf_file) if gguf_file else model_path
        # the engine may have been started from another folder of the same weights (get_vllm_engine)
        engine_path = _VLLM_ENGINE[0][0] if _VLLM_ENGINE is not None else model
        inputs = engine_prompts(prompts, model_path=model, engine_path=engine_path)
        return generate_vllm(engine, inputs, chunk_size=vllm_chunk_size, progress=progress, **kwargs)
    model, tokenizer = _get_hf_model(model_path, gguf_file=gguf_file, dtype=dtype, device=device)
    return generate_hf(model, tokenizer, prompts, batch_size=batch_size, progress=progress, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face backend


def _get_hf_model(model_path: str, *, gguf_file: str | None, dtype: str, device: str | None) -> tuple[Any, Any]:
    """Load (or reuse the last loaded) model, and ``model_path``'s own tokenizer; only one model is kept in memory.

    The model is reused for any path with the same weight files (``evaluation.model_identity.weights_key``: the
    task folders of one merged model), so each of its datasets does not load it again.
    """
    global _HF_MODEL
    import torch

    from evaluation.model_loading import load_causal_lm_for_generation, load_tokenizer_for_generation

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights = weights_key(os.path.join(model_path, gguf_file) if gguf_file else model_path)
    key = (weights, gguf_file, dtype, device)
    if _HF_MODEL is None or _HF_MODEL[0] != key:
        _HF_MODEL = None  # free the previous model before loading the next one
        model, tokenizer = load_causal_lm_for_generation(model_path, gguf_file=gguf_file, dtype=dtype, device=device)
        _HF_MODEL = (key, model, {model_path: tokenizer})
    tokenizers = _HF_MODEL[2]
    if model_path not in tokenizers:
        logger.info("%s: same weight files as the loaded model, not loaded again; using its own tokenizer", model_path)
        tokenizers[model_path] = load_tokenizer_for_generation(model_path, gguf_file=gguf_file)
    return _HF_MODEL[1], tokenizers[model_path]


def release_hf_model() -> None:
    """Drop the cached Hugging Face model (the next :func:`generate` call loads again)."""
    global _HF_MODEL
    _HF_MODEL = None


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        position = text.find(s)
        if position != -1:
            cut = min(cut, position)
    return text[:cut]


def _stop_criteria(tokenizer: Any, stop: Sequence[str], prompt_length: int) -> Any:
    """A StoppingCriteria that marks a row done once its decoded generated tail contains a stop string."""
    import torch
    from transformers import StoppingCriteria

    # a token decodes to at least one character except special tokens, so this many tokens cover any stop string
    lookback = max(len(s) for s in stop) + 8

    class StopOnStrings(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
            tails = tokenizer.batch_decode(input_ids[:, prompt_length:][:, -lookback:], skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stop) for t in tails], device=input_ids.device)

    return StopOnStrings()


def _decode_generated(tokenizer: Any, prompt_ids: Any, new_ids: Any) -> str:
    """Decode new tokens the way vLLM detokenizes: in the context of the prompt's last tokens.

    Decoding the new tokens alone drops the leading space of a SentencePiece word-start token (``▁The`` ->
    ``The``); vLLM keeps it. Decode ``prompt tail + new`` and remove the decoded prompt tail instead.
    """
    context = prompt_ids[-4:].tolist()
    new = new_ids.tolist()
    prefix = tokenizer.decode(context, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    full = tokenizer.decode(context + new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if full.startswith(prefix):
        return full[len(prefix) :]
    return tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _generate_hf_batch(model: Any, tokenizer: Any, batch: Sequence[str], gen_kwargs: Mapping[str, Any]) -> list[Any]:
    """``(prompt_ids, new_ids)`` per row of one left-padded batch (finished rows are right-filled with pad)."""
    import torch
    from transformers import StoppingCriteriaList

    encoded = tokenizer(list(batch), return_tensors="pt", padding=True).to(model.device)
    prompt_length = encoded["input_ids"].shape[1]
    kwargs = {k: v for k, v in gen_kwargs.items() if k != "stop"}
    if gen_kwargs["stop"]:
        criteria = _stop_criteria(tokenizer, gen_kwargs["stop"], prompt_length)
        kwargs["stopping_criteria"] = StoppingCriteriaList([criteria])
    with torch.inference_mode():
        output = model.generate(**encoded, **kwargs)
    return list(zip(encoded["input_ids"].cpu(), output[:, prompt_length:].cpu(), strict=True))


def generate_hf(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_tokens: int,
    stop: Sequence[str] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    on_result: ResultCallback | None = None,
    progress: bool = True,
) -> list[str]:
    """Batched ``model.generate`` over already-loaded objects (e.g. a model masked with DARE in memory).

    Prompts are sorted by token length (longest first, so memory problems show up in the first batch), left
    padded, generated greedily (``temperature == 0``) and returned in the original order. Arguments as in
    :func:`generate`; ``tokenizer`` needs a pad token (``load_tokenizer_for_generation`` sets one).
    """
    from tqdm.auto import tqdm

    _check_decoding_args(max_tokens, temperature, top_p, batch_size)
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer must have a pad token, got None; use load_tokenizer_for_generation()")
    tokenizer.padding_side = "left"
    gen_kwargs = _hf_generation_kwargs(model, tokenizer, max_tokens, temperature, top_p, stop)
    lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    results: list[str | None] = [None] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for indices in tqdm(batches, desc="generate (hf)", unit="batch", disable=not progress):
        rows = _generate_hf_batch(model, tokenizer, [prompts[i] for i in indices], gen_kwargs)
        for index, (prompt_ids, new_ids) in zip(indices, rows, strict=True):
            # pad and eos are special tokens: skip_special_tokens drops the fill after a finished row
            results[index] = cut_at_stop(_decode_generated(tokenizer, prompt_ids, new_ids), stop)
            if on_result is not None:
                on_result(index, results[index])
    return [r if r is not None else "" for r in results]


def _hf_generation_kwargs(
    model: Any, tokenizer: Any, max_tokens: int, temperature: float, top_p: float, stop: Sequence[str]
) -> dict[str, Any]:
    eos = model.generation_config.eos_token_id
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": eos if eos is not None else tokenizer.eos_token_id,
        "stop": tuple(stop),
    }
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


# ---------------------------------------------------------------------------------------------------------------
# vLLM backend


def get_vllm_engine(
    model_path: str,
    *,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    gguf_file: str | None = None,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    max_model_len: int | None = None,
    enforce_eager: bool = False,
) -> Any:
    """The process's single ``vllm.LLM`` engine, created on first use.

    ``gpu_memory_utilization``, ``max_model_len`` and ``enforce_eager`` go to ``vllm.LLM`` as they are (memory
    and speed knobs; greedy texts do not depend on them). A request for another folder with the same weight files
    and a tokenizer that decodes alike (``evaluation.model_identity.can_share_model``) gets the engine already
    started; :func:`generate` then tokenises that folder's prompts with its own tokenizer.

    Raises:
        ValueError: an engine for other weights (or a tokenizer that decodes differently, or other engine
            settings) already exists in this process; vLLM cannot host two engines in one process, so run each
            model in its own process (``evaluation.generation_subprocess.run_jobs_in_subprocess``).
    """
    global _VLLM_ENGINE
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if max_model_len is not None and max_model_len < 1:
        raise ValueError(f"max_model_len must be >= 1 or None (the model's), got {max_model_len}")
    model = os.path.join(model_path, gguf_file) if gguf_file else model_path
    engine_kwargs = dict(tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                         gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                         enforce_eager=enforce_eager)
    key = (model, *engine_kwargs.values())
    if _VLLM_ENGINE is not None:
        held, engine = _VLLM_ENGINE
        if held == key:
            return engine
        if held[1:] == key[1:] and can_share_model(held[0], model, same_decoding=True):
            logger.info("%s: same weight files as the vLLM engine of %s and a tokenizer that decodes alike; "
                        "reusing the engine", model, held[0])
            return engine
        raise ValueError(
            f"this process already holds a vLLM engine for {held}, got a request for {key} (other weights, a "
            "tokenizer that decodes differently, or other engine settings); vLLM cannot run two engines in one "
            "process: evaluate each model in its own process with "
            "evaluation.generation_subprocess.run_in_subprocess(...) (run_jobs_in_subprocess for several datasets) or "
            "`python -m evaluation.generation_subprocess --request ...`"
        )
    from vllm import LLM  # imported lazily: vLLM initialises CUDA on import

    logger.info("creating the vLLM engine for %s (%s)", model, ", ".join(f"{k}={v}" for k, v in engine_kwargs.items()))
    engine = LLM(model=model, seed=0, **engine_kwargs)
    _VLLM_ENGINE = (key, engine)
    return engine


def generate_vllm(
    engine: Any,
    prompts: Sequence[str | Mapping[str, Any]],
    *,
    max_tokens: int,
    stop: Sequence[str] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    chunk_size: int = DEFAULT_VLLM_CHUNK_SIZE,
    on_result: ResultCallback | None = None,
    progress: bool = True,
) -> list[str]:
    """``engine.generate`` on consecutive chunks of ``chunk_size`` prompts (texts, or ``{"prompt_token_ids": ...}``);
    texts in prompt order.

    vLLM batches the prompts of a chunk itself. After each chunk its texts go to ``on_result`` (in prompt order)
    before the next chunk starts, so a generations file grows chunk by chunk and a run killed mid-way loses at
    most the running chunk. Greedy texts are those of one call with every prompt: each request is decoded on
    its own (up to vLLM's usual batch-composition numerics, which one big call has too).
    """
    from vllm import SamplingParams

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    params = SamplingParams(n=1, temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=list(stop) or None)
    texts: list[str] = []
    starts = range(0, len(prompts), chunk_size)
    for number, start in enumerate(starts, start=1):
        chunk = list(prompts[start : start + chunk_size])
        outputs = engine.generate(chunk, params, use_tqdm=progress)
        if len(outputs) != len(chunk):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for a chunk of {len(chunk)} prompts")
        chunk_texts = [output.outputs[0].text for output in outputs]
        if on_result is not None:
            for offset, text in enumerate(chunk_texts):
                on_result(start + offset, text)
        texts.extend(chunk_texts)
        if len(starts) > 1:
            logger.info("vLLM chunk %d/%d done (%d/%d prompts)", number, len(starts), len(texts), len(prompts))
    return texts
