"""LLM scripts on a tiny Llama family built here: DARE inference, merging (incl. DARE-TIES), direct inference.

The family mimics the paper's: a base with 64 vocabulary rows, an "instruct" and a "code" fine-tune with 64 rows,
and a "math" fine-tune with a ``[PAD]`` token (65 rows, like WizardMath). Each fine-tune has its own tokenizer.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_family, tiny_llama_config

import direct_inference_merged_llms_instruct_math_code as direct_script
import inference_llms_instruct_math_code as inference_script
import merge_llms_instruct_math_code as merge_script
from evaluation import generation
from llms import llm_merging
from llms.llm_cli import merge_config_from_args, settings_from_args
from llms.llm_configs import LlmInferenceConfig, LlmMergeConfig
from llms.llm_pipeline import EvaluationSettings
from model_merging_methods import Dare, Recipe

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = [f"w{i:02d}" for i in range(60)]


def _tokenizer(pad_token: str | None):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<extra>": 3, **{w: 4 + i for i, w in enumerate(WORDS)}}
    if pad_token == "[PAD]":
        vocab["[PAD]"] = 64
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    kwargs = {"pad_token": pad_token} if pad_token else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   **kwargs)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, str]:
    """Folders of the base and the three fine-tunes, keyed by the paper's short names."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny_family")
    config = tiny_llama_config(bos_token_id=1, eos_token_id=2, pad_token_id=None)
    base, (instruct, math, code) = make_family(LlamaForCausalLM, config, num_finetuned=3, delta_std=0.02)
    math.config = copy.deepcopy(math.config)  # make_family shares one config object between the models
    math.resize_token_embeddings(65)
    models = {"Llama-2-13b-hf": (base, None), "WizardLM-13B-V1.2": (instruct, None),
              "WizardMath-13B-V1.0": (math, "[PAD]"), "llama-2-13b-code-alpaca": (code, "<extra>")}
    paths = {}
    for name, (model, pad) in models.items():
        folder = root / name
        model.save_pretrained(folder, max_shard_size="50KB")
        _tokenizer(pad).save_pretrained(folder)
        paths[name] = str(folder)
    return paths


@pytest.fixture(autouse=True)
def _fresh_model_cache():
    generation.release_hf_model()
    yield
    generation.release_hf_model()


def _common(family, tmp_path, shared_data_dir) -> list[str]:
    overrides = [arg for name, path in family.items() for arg in ("--model_path", f"{name}={path}")]
    return [*overrides, "--backend", "hf", "--data_dir", str(shared_data_dir), "--results_dir",
            str(tmp_path / "results"), "--end_index", "1", "--max_new_tokens", "3", "--quiet"]


def _load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def _run_dir(results: Path, script: str) -> Path:
    configs = list((results / script).rglob("config.json"))
    assert len(configs) == 1, configs
    return configs[0].parent


def test_dare_inference_writes_bf16_model_that_loads_and_deletes_it(family, tmp_path, shared_data_dir):
    save_models = tmp_path / "save_models"
    argv = [*_common(family, tmp_path, shared_data_dir), "--finetuned_model_name", "WizardMath-13B-V1.0",
            "--dataset_name", "gsm8k", "--weight_mask_rate", "0.9", "--use_weight_rescale",
            "--save_models_dir", str(save_models)]
    metrics = inference_script.main([*argv, "--keep_model"])
    assert set(metrics["gsm8k"]) >= {"accuracy", "accuracy_flexible", "num_invalid", "num_examples", "version"}
    folder = save_models / "gsm8k" / "WizardMath-13B-V1.0_inference_mask_0.9_rescale_True"
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model, tokenizer = _load(folder)
    assert model.get_input_embeddings().weight.shape[0] == 65 and tokenizer.pad_token == "[PAD]"
    base, _ = _load(Path(family["Llama-2-13b-hf"]))
    name = "model.layers.0.mlp.up_proj.weight"
    merged = model.state_dict()[name]
    unchanged = (merged == base.state_dict()[name].to(torch.bfloat16).to(merged.dtype)).float().mean().item()
    assert 0.8 < unchanged < 0.97  # ~90% of the deltas dropped
    # without --keep_model the temporary folder and its empty parents are removed
    metrics = inference_script.main([*argv, "--weight_mask_rate", "0.5"])
    assert metrics["gsm8k"]["num_examples"] == 1
    assert not (save_models / "gsm8k" / "WizardMath-13B-V1.0_inference_mask_0.5_rescale_True").exists()


def test_inference_writes_alpaca_eval_and_mbpp_external_files(family, tmp_path, shared_data_dir):
    common = [*_common(family, tmp_path, shared_data_dir), "--finetuned_model_name", "WizardLM-13B-V1.2",
              "--weight_mask_rate", "0.0", "--end_index", "2"]
    metrics = inference_script.main([*common, "--dataset_name", "alpaca_eval"])
    assert metrics == {"alpaca_eval": {"num_examples": 2, "version": 1}}
    run_dir = _run_dir(tmp_path / "results", "inference_llms_instruct_math_code/WizardLM-13B-V1.2/alpaca_eval")
    outputs = json.loads((run_dir / "external" / "alpaca_eval_model_outputs.json").read_text())
    assert [set(o) for o in outputs] == [{"instruction", "output", "generator", "dataset"}] * 2
    metrics = inference_script.main([*common, "--dataset_name", "mbpp"])
    assert metrics["mbpp"]["num_examples"] == 2 and "pass@1" not in metrics["mbpp"]
    run_dir = _run_dir(tmp_path / "results", "inference_llms_instruct_math_code/WizardLM-13B-V1.2/mbpp")
    generations = json.loads((run_dir / "external" / "mbpp_generations.json").read_text())
    assert len(generations) == 500 and [len(g) for g in generations[:3]] == [1, 1, 0]
    predictions = [json.loads(line) for line in (run_dir / "predictions" / "mbpp.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == [11, 12] and {p["result"] for p in predictions} == {"not executed"}


def _merge_flags(method: list[str]) -> list[str]:
    return ["--merge_instruct", "--merge_math", *method]


DARE_TIES = ["--merging_method_name", "mask_merging", "--mask_apply_method", "ties_merging", "--weight_mask_rate",
             "0.2", "--use_weight_rescale"]


def test_dare_ties_merge_once_per_task_tokenizers_then_direct_inference(family, tmp_path, shared_data_dir):
    store = tmp_path / "merged"
    argv = [*_common(family, tmp_path, shared_data_dir), *_merge_flags(DARE_TIES), "--save_merge_models_dir",
            str(store)]
    metrics = merge_script.main([*argv, "--keep_model"])
    assert set(metrics) == {"alpaca_eval", "gsm8k", "MATH"}
    name = ("mask_merging/ties_merging_scaling_coefficient_1.0_param_value_mask_rate_0.8_ties_trim_scope_per_tensor/"
            "mask_0.2_0.2_rescale_True")
    folders = {task: store / "instruct_math" / task / name for task in ("instruct", "math")}
    (instruct_model, instruct_tok), (math_model, math_tok) = _load(folders["instruct"]), _load(folders["math"])
    assert instruct_tok.pad_token is None and math_tok.pad_token == "[PAD]"  # each task keeps its own tokenizer
    assert instruct_model.get_input_embeddings().weight.shape[0] == 65  # mergelm vocab policy: the largest rows
    for weights in folders["instruct"].glob("*.safetensors"):  # merged once: the task folders share the files
        assert os.path.samefile(weights, folders["math"] / weights.name)
    torch.testing.assert_close(instruct_model.state_dict(), math_model.state_dict())
    run_dir = _run_dir(tmp_path / "results", "merge_llms_instruct_math_code")
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert {p.name for p in (run_dir / "predictions").iterdir()} == {"alpaca_eval.jsonl", "gsm8k.jsonl", "MATH.jsonl"}
    # every generation records how it was made, so a resumed file never mixes generations made differently
    [line] = (run_dir / "generations" / "gsm8k.jsonl").read_text().splitlines()
    assert json.loads(line)["settings"] == {"backend": "hf", "dtype": "auto", "max_tokens": 3,
                                            "save_dtype": "bfloat16"}
    # --resume reuses the finished merge and the finished generations
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llm_merging, "merge_checkpoints", _fail("merge_checkpoints"))
        patch.setattr(generation, "generate", _fail("generate"))
        assert merge_script.main([*argv, "--keep_model", "--resume"]) == metrics
    # a later run without --keep_model reuses the kept merge and never deletes it
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llm_merging, "merge_checkpoints", _fail("merge_checkpoints"))
        assert merge_script.main([*argv, "--resume"]) == metrics
    assert all((folder / "config.json").is_file() for folder in folders.values())
    direct = direct_script.main([*argv, "--evaluate_task", "math"])
    assert set(direct) == {"gsm8k", "MATH"} and direct["gsm8k"] == metrics["gsm8k"]
    by_path = direct_script.main([*_common(family, tmp_path, shared_data_dir), "--evaluate_task", "instruct",
                                  "--merged_model_path", str(folders["instruct"])])
    assert set(by_path) == {"alpaca_eval"} and folders["instruct"].exists()


def _fail(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} must not be called")

    return fail


def test_resume_reuses_a_finished_merge_only_with_the_same_merge_arguments(family, tmp_path, monkeypatch):
    merged, checked = [], []
    real_merge = llm_merging.merge_checkpoints

    def counted_merge(*args, **kwargs):
        merged.append(kwargs["dtype"])
        return real_merge(*args, **kwargs)

    monkeypatch.setattr(llm_merging, "merge_checkpoints", counted_merge)
    monkeypatch.setattr(llm_merging, "check_homology", lambda *a, **k: checked.append(a))
    out = tmp_path / "merged"
    finetuned = [family["WizardLM-13B-V1.2"], family["WizardMath-13B-V1.0"]]

    def merge(save_dtype: str, scaling_coefficient: float = 0.5) -> None:
        llm_merging.merge_into(out, family["Llama-2-13b-hf"], finetuned, save_dtype=save_dtype, copy_config_from=0,
                               recipe=Recipe("task_arithmetic", {"scaling_coefficient": scaling_coefficient}),
                               resume=True, progress=False)

    merge("bfloat16")
    merge("bfloat16")  # the same merge: reused, and the homology preflight is not run again
    assert merged == ["bfloat16"] and len(checked) == 1
    merge("float32")  # another save dtype: merged again, not the bf16 folder evaluated as if it were float32
    assert merged == ["bfloat16", "float32"] and len(checked) == 2
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    merge("float32", scaling_coefficient=1.0)
    assert merged == ["bfloat16", "float32", "float32"]


def test_generation_and_save_settings_name_the_run_folders():
    def merge_dir(**kwargs) -> str:
        config = LlmMergeConfig(merge_tasks=("instruct", "math"), recipe=Recipe("task_arithmetic"), **kwargs)
        return config.run_dir("r").name

    assert merge_dir(evaluation=EvaluationSettings(backend="hf")) == "backend=hf,scaling_coefficient=1.0"
    assert merge_dir(evaluation=EvaluationSettings(backend="hf", dtype="float16"), save_dtype="float32") == (
        "backend=hf,dtype=float16,save_dtype=float32,scaling_coefficient=1.0")

    def inference_dir(dare: Dare | None) -> str:
        config = LlmInferenceConfig(finetuned_model_name="WizardMath-7B-V1.0", dataset_name="gsm8k", dare=dare,
                                    save_dtype="float32", evaluation=EvaluationSettings(backend="hf"))
        return config.run_dir("r").name

    assert "save_dtype=float32" in inference_dir(Dare(0.9))
    assert inference_dir(None) == "backend=hf,weight_mask_rate=0.0"  # no model written: its save dtype is moot


def test_merge_generates_each_dataset_in_a_subprocess_and_deletes_folders(family, tmp_path, shared_data_dir):
    store = tmp_path / "merged"
    method = ["--merging_method_name", "task_arithmetic", "--scaling_coefficient", "0.5"]
    argv = [*_common(family, tmp_path, shared_data_dir), *_merge_flags(method), "--save_merge_models_dir",
            str(store), "--subprocess_per_task"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generation, "generate", _fail("in-process generate"))
        metrics = merge_script.main(argv)
    assert set(metrics) == {"alpaca_eval", "gsm8k", "MATH"}
    assert not any(store.rglob("*.safetensors"))


# --- validation happens before any model is read ----------------------------------------------------------------


@pytest.fixture
def no_heavy_work(monkeypatch):
    monkeypatch.setattr(llm_merging, "merge_checkpoints", _fail("merge_checkpoints"))
    monkeypatch.setattr(generation, "generate", _fail("generate"))


@pytest.mark.parametrize(
    ("script", "argv", "error", "match"),
    [
        (merge_script, ["--merge_math"], ValueError, "at least two"),
        (merge_script, _merge_flags(["--merging_method_name", "mask_merging", "--weight_mask_rate", "1.0"]),
         ValueError, "weight_mask_rate"),
        (merge_script, _merge_flags(["--param_value_mask_rate", "1.5", "--merging_method_name", "ties_merging"]),
         ValueError, "param_value_mask_rate"),
        (merge_script, _merge_flags(["--resume", "--overwrite"]), ValueError, "resume and overwrite"),
        (inference_script, ["--finetuned_model_name", "WizardMath-7B-V1.0", "--wizardcoder_use_llama2_as_backbone"],
         ValueError, "wizardcoder_use_llama2_as_backbone"),
        (inference_script, ["--model_path", "WizardLM-13B-V1.2=/does/not/exist"], FileNotFoundError, "does not exist"),
        (inference_script, ["--end_index", "0"], ValueError, "start_index < end_index"),
        (direct_script, _merge_flags(["--evaluate_task", "code"]), ValueError, "--merge_code"),
    ],
)
def test_flags_are_validated_before_heavy_work(no_heavy_work, tmp_path, script, argv, error, match):
    with pytest.raises(error, match=match):
        script.main([*argv, "--results_dir", str(tmp_path)])


def test_direct_inference_without_a_merged_folder_names_the_fix(no_heavy_work, tmp_path, shared_data_dir):
    argv = [*_merge_flags([]), "--evaluate_task", "math", "--save_merge_models_dir", str(tmp_path / "none"),
            "--results_dir", str(tmp_path / "results"), "--backend", "hf"]
    with pytest.raises(FileNotFoundError, match="--keep_model"):
        direct_script.main(argv)


@pytest.mark.skipif(generation.vllm_available(), reason="vLLM is usable here")
def test_vllm_backend_without_cuda_is_refused_up_front(no_heavy_work, tmp_path):
    with pytest.raises(ValueError, match="--backend hf"):
        inference_script.main(["--backend", "vllm", "--results_dir", str(tmp_path)])


def test_unknown_method_is_an_argparse_error():
    with pytest.raises(SystemExit):
        merge_script.parse_args(_merge_flags(["--merging_method_name", "fisher_merging"]))


# --- MergeLM's README commands parse and keep MergeLM's folder names ---------------------------------------------


@pytest.mark.parametrize(
    ("flags", "name"),
    [
        (["--weight_mask_rate", "0.0"], "WizardMath-7B-V1.0_inference_mask_0.0"),
        (["--weight_mask_rate", "0.9", "--use_weight_rescale"], "WizardMath-7B-V1.0_inference_mask_0.9_rescale_True"),
        (["--weight_mask_rate", "0.9"], "WizardMath-7B-V1.0_inference_mask_0.9_rescale_False"),
        (["--weight_mask_rate", "0.9", "--mask_strategy", "magnitude"],
         "WizardMath-7B-V1.0_inference_mask_0.9_rescale_False_strategy_magnitude"),
        (["--weight_mask_rate", "0.9", "--use_weight_rescale", "--weight_format", "finetuned_weight"],
         "WizardMath-7B-V1.0_inference_mask_0.9_rescale_True_weight_format_finetuned_weight"),
    ],
)
def test_readme_inference_commands_keep_mergelm_names(flags, name):
    args = inference_script.parse_args(["--dataset_name", "gsm8k", "--finetuned_model_name", "WizardMath-7B-V1.0",
                                        "--tensor_parallel_size", "1", *flags])
    config = inference_script.build_config(args)
    assert config.save_model_name == name and config.evaluation.end_index == sys.maxsize


@pytest.mark.parametrize(
    ("flags", "name"),
    [
        (["--merging_method_name", "average_merging"], "average_merging"),
        (["--merging_method_name", "task_arithmetic", "--scaling_coefficient", "1.0"],
         "task_arithmetic_scaling_coefficient_1.0"),
        (["--merging_method_name", "mask_merging", "--use_weight_rescale", "--weight_mask_rate", "0.2",
          "--mask_apply_method", "average_merging"], "mask_merging/average_merging/mask_0.2_0.2_rescale_True"),
    ],
)
def test_readme_merge_commands_keep_mergelm_names(flags, name):
    args = merge_script.parse_args([*_merge_flags(flags), "--tensor_parallel_size", "1"])
    config = merge_config_from_args(args, settings_from_args(args))
    assert config.save_model_name == name
    assert config.merged_model_dir("math") == Path("save_merge_models", "instruct_math", "math", *name.split("/"))
    direct = direct_script.build_config(direct_script.parse_args([*_merge_flags(flags), "--evaluate_task", "math"]))
    assert direct.model_dir() == config.merged_model_dir("math")


# --- vLLM (GPU only) -------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not generation.vllm_available(), reason="needs vLLM and CUDA")
def test_vllm_merge_runs_one_engine_per_process(family, tmp_path, shared_data_dir):
    argv = [*_common(family, tmp_path, shared_data_dir), *_merge_flags(DARE_TIES), "--save_merge_models_dir",
            str(tmp_path / "merged")]
    argv[argv.index("hf")] = "vllm"
    metrics = merge_script.main(argv)
    assert set(metrics) == {"alpaca_eval", "gsm8k", "MATH"}


@pytest.mark.gpu
@pytest.mark.skipif(not generation.vllm_available(), reason="needs vLLM and CUDA")
def test_vllm_dare_inference(family, tmp_path, shared_data_dir):
    argv = [*_common(family, tmp_path, shared_data_dir), "--finetuned_model_name", "WizardMath-13B-V1.0",
            "--dataset_name", "gsm8k", "--weight_mask_rate", "0.9", "--use_weight_rescale",
            "--save_models_dir", str(tmp_path / "save_models")]
    argv[argv.index("hf")] = "vllm"
    assert inference_script.main(argv)["gsm8k"]["num_examples"] == 1


def test_wizardlm_7b_weight_diff_is_recovered_once_then_evaluated(family, tmp_path, shared_data_dir):
    from safetensors.torch import save_file

    base, _ = _load(Path(family["Llama-2-13b-hf"]))
    finetuned, tokenizer = _load(Path(family["WizardLM-13B-V1.2"]))
    diff_dir = tmp_path / "WizardLM-7B-V1.0-diff"
    diff_dir.mkdir()
    base_sd = base.state_dict()
    diff = {k: (v - base_sd[k]).contiguous() for k, v in finetuned.state_dict().items()}
    save_file(diff, str(diff_dir / "model.safetensors"))
    finetuned.config.save_pretrained(diff_dir)
    tokenizer.save_pretrained(diff_dir)
    save_models = tmp_path / "save_models"
    argv = ["--finetuned_model_name", "WizardLM-7B-V1.0", "--model_path", f"WizardLM-7B-V1.0={diff_dir}",
            "--model_path", f"llama-7b-hf={family['Llama-2-13b-hf']}", "--weight_mask_rate", "0.0",
            "--dataset_name", "gsm8k", "--save_models_dir", str(save_models),
            *_common({}, tmp_path, shared_data_dir)]
    assert inference_script.main(argv)["gsm8k"]["num_examples"] == 1
    recovered, _ = _load(save_models / "WizardLM-7B-V1.0-recovered")
    torch.testing.assert_close(recovered.state_dict(), finetuned.state_dict(), atol=1e-6, rtol=0)


def test_missing_data_fails_before_the_run_folder_is_created(no_heavy_work, family, tmp_path, monkeypatch):
    from evaluation import data

    monkeypatch.delenv("MERGELM_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "DEFAULT_DATA_DIR", tmp_path / "empty")
    argv = [*_common(family, tmp_path, tmp_path / "empty"), *_merge_flags([])]
    with pytest.raises(FileNotFoundError, match="prepare_math_code_data.py"):
        merge_script.main(argv)
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("script", [inference_script, merge_script, direct_script])
def test_help_lists_the_flags(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(["--help"])
    assert exit_info.value.code == 0 and "--tensor_parallel_size" in capsys.readouterr().out


def test_a_rescale_factor_names_its_own_model_folder():
    from llms.llm_configs import LlmInferenceConfig
    from model_merging_methods import Dare

    dare = LlmInferenceConfig(finetuned_model_name="WizardMath-7B-V1.0", dataset_name="gsm8k", dare=Dare(0.9))
    darex = LlmInferenceConfig(finetuned_model_name="WizardMath-7B-V1.0", dataset_name="gsm8k",
                               dare=Dare(0.9, rescale_factor=5.0))
    assert dare.save_model_name == "WizardMath-7B-V1.0_inference_mask_0.9_rescale_True"  # MergeLM's name
    assert darex.save_model_name == "WizardMath-7B-V1.0_inference_mask_0.9_rescale_True_factor_5.0"
    assert darex.run_dir("r") != dare.run_dir("r")


def _save_lora_adapter(base_folder: str, folder: Path, seed: int) -> None:
    """A PEFT LoRA adapter of the tiny base (random non-zero factors), saved without a tokenizer."""
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM

    model = peft.get_peft_model(LlamaForCausalLM.from_pretrained(base_folder),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(folder)


def test_lora_adapters_stand_for_fine_tunes_in_inference_and_merging(family, tmp_path, shared_data_dir):
    """``--model_path NAME=ADAPTER``: inference evaluates base + ΔW (with DARE: base + DARE(ΔW)); a merge mixes the
    adapter with full fine-tunes; config and tokenizer come from the base."""
    from model_merging_methods.lora import adapter_delta_state_dict

    adapter = tmp_path / "math-adapter"
    _save_lora_adapter(family["Llama-2-13b-hf"], adapter, seed=5)
    paths = {**family, "WizardMath-13B-V1.0": str(adapter)}
    common = [*[a for n, p in paths.items() for a in ("--model_path", f"{n}={p}")], "--backend", "hf", "--data_dir",
              str(shared_data_dir), "--results_dir", str(tmp_path / "results"), "--end_index", "1",
              "--max_new_tokens", "3", "--quiet", "--save_dtype", "float32"]
    save_models = tmp_path / "save_models"
    argv = [*common, "--finetuned_model_name", "WizardMath-13B-V1.0", "--dataset_name", "gsm8k",
            "--save_models_dir", str(save_models), "--keep_model"]
    assert inference_script.main([*argv, "--weight_mask_rate", "0.0"])["gsm8k"]["num_examples"] == 1
    model, tokenizer = _load(save_models / "gsm8k" / "WizardMath-13B-V1.0_inference_mask_0.0")
    base, _ = _load(Path(family["Llama-2-13b-hf"]))
    deltas = adapter_delta_state_dict(adapter, base.state_dict())
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(model.state_dict()[name], base.state_dict()[name] + deltas[name], rtol=0, atol=1e-6)
    assert tokenizer.pad_token is None  # the base's tokenizer: the adapter was saved without one
    inference_script.main([*argv, "--weight_mask_rate", "0.9", "--use_weight_rescale"])
    dared, _ = _load(save_models / "gsm8k" / "WizardMath-13B-V1.0_inference_mask_0.9_rescale_True")
    kept = (dared.state_dict()[name] != base.state_dict()[name]).float().mean().item()
    assert 0.03 < kept < 0.2  # about 10 % of ΔW's entries survive
    store = tmp_path / "merged"
    metrics = merge_script.main([*common, *_merge_flags(DARE_TIES), "--save_merge_models_dir", str(store),
                                 "--keep_model"])
    assert set(metrics) == {"alpaca_eval", "gsm8k", "MATH"}
    math_view = next((store / "instruct_math" / "math").rglob("config.json")).parent
    assert _load(math_view)[1].pad_token is None  # the base's tokenizer stands in for the adapter's
