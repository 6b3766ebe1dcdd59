"""Every command of the original MergeLM README is accepted by these scripts (flag names, values, choices)."""

from __future__ import annotations

import importlib
import shlex

import pytest

ORIGINAL_README_COMMANDS = [
    "python train_plms_glue.py --language_model_name roberta-base --dataset_name cola --learning_rate 1e-5 "
    "--num_runs 5",
    "python train_plms_glue.py --language_model_name roberta-base --dataset_name cola --multitask_training "
    "--auxiliary_dataset_name rte --learning_rate 1e-5 --num_runs 5",
    "python inference_plms_glue.py --language_model_name roberta-base --weight_mask_rate 0.0",
    "python inference_plms_glue.py --language_model_name roberta-base --weight_mask_rate 0.9 --use_weight_rescale",
    "python inference_plms_glue.py --language_model_name roberta-base --weight_mask_rate 0.9",
    "python inference_plms_glue.py --language_model_name roberta-base --weight_mask_rate 0.9 "
    "--mask_strategy magnitude",
    "python inference_plms_glue.py --language_model_name roberta-base --weight_mask_rate 0.9 --use_weight_rescale "
    "--weight_format finetuned_weight",
    "python merge_plms_glue.py --merging_method_name average_merging --language_model_name roberta-base",
    "python merge_plms_glue.py --merging_method_name fisher_merging --normalize_fisher_weight "
    "--language_model_name roberta-base",
    "python merge_plms_glue.py --merging_method_name mask_merging --use_weight_rescale --language_model_name "
    "roberta-base --mask_apply_method average_merging",
    "python inference_llms_instruct_math_code.py --dataset_name gsm8k --finetuned_model_name WizardMath-7B-V1.0 "
    "--tensor_parallel_size 1 --weight_mask_rate 0.0",
    "python inference_llms_instruct_math_code.py --dataset_name gsm8k --finetuned_model_name WizardMath-7B-V1.0 "
    "--tensor_parallel_size 1 --weight_mask_rate 0.9 --use_weight_rescale",
    "python inference_llms_instruct_math_code.py --dataset_name gsm8k --finetuned_model_name WizardMath-7B-V1.0 "
    "--tensor_parallel_size 1 --weight_mask_rate 0.9",
    "python inference_llms_instruct_math_code.py --dataset_name gsm8k --finetuned_model_name WizardMath-7B-V1.0 "
    "--tensor_parallel_size 1 --weight_mask_rate 0.9 --mask_strategy magnitude",
    "python inference_llms_instruct_math_code.py --dataset_name gsm8k --finetuned_model_name WizardMath-7B-V1.0 "
    "--tensor_parallel_size 1 --weight_mask_rate 0.9 --use_weight_rescale --weight_format finetuned_weight",
    "python merge_llms_instruct_math_code.py --merge_instruct --merge_math --merging_method_name average_merging "
    "--tensor_parallel_size 1",
    "python merge_llms_instruct_math_code.py --merge_instruct --merge_math --merging_method_name task_arithmetic "
    "--scaling_coefficient 1.0 --tensor_parallel_size 1",
    "python merge_llms_instruct_math_code.py --merge_instruct --merge_math --merging_method_name mask_merging "
    "--use_weight_rescale --weight_mask_rate 0.2 --mask_apply_method average_merging --tensor_parallel_size 1",
    "python direct_inference_merged_llms_instruct_math_code.py --merge_instruct --merge_math --merging_method_name "
    "mask_merging --use_weight_rescale --weight_mask_rate 0.2 --mask_apply_method average_merging "
    "--tensor_parallel_size 1 --evaluate_task instruct",
    "python direct_inference_merged_llms_instruct_math_code.py --merge_instruct --merge_math --merging_method_name "
    "mask_merging --use_weight_rescale --weight_mask_rate 0.2 --mask_apply_method average_merging "
    "--tensor_parallel_size 1 --evaluate_task math",
]


@pytest.mark.parametrize("command", ORIGINAL_README_COMMANDS)
def test_original_readme_command_is_accepted(command):
    words = shlex.split(command)
    assert words[0] == "python"
    module = importlib.import_module(words[1].removesuffix(".py"))
    args = module.parse_args(words[2:])  # argparse exits (SystemExit) on an unknown flag or a bad choice
    for flag in (w for w in words[2:] if w.startswith("--")):
        assert hasattr(args, flag[2:]), flag
    if hasattr(module, "build_config"):
        module.build_config(args)  # the scripts' own validation accepts the original values
