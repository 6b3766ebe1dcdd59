"""Task registry, exact prompts, decoding parameters and the MBPP 493 prompt quirk."""

from __future__ import annotations

import pytest

import evaluation
from evaluation.tasks import TASKS, build_prompt, build_prompts, get_task, mbpp_prompt_text


def test_registry_and_unknown_name():
    assert sorted(TASKS) == ["MATH", "alpaca_eval", "gsm8k", "human_eval", "mbpp"]
    assert evaluation.get_task("mbpp") is TASKS["mbpp"]
    with pytest.raises(ValueError, match="Did you mean: gsm8k.*Available: MATH, alpaca_eval, gsm8k"):
        get_task("gsm8")


def test_decoding_defaults_match_the_paper():
    stop = ("Instruction:", "Instruction", "Response:", "Response")
    for name, max_tokens in [("gsm8k", 1024), ("MATH", 2048), ("human_eval", 2048), ("mbpp", 2048),
                             ("alpaca_eval", 2048)]:
        sampling = get_task(name).sampling
        assert (sampling.temperature, sampling.top_p, sampling.max_tokens) == (0.0, 1.0, max_tokens)
        assert sampling.stop == (stop if name in ("gsm8k", "MATH") else ())


def test_math_prompt_exact():
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nWhat is {1+1}?\n\n### Response: Let's think step by step."
    )
    assert build_prompt("gsm8k", {"question": "What is {1+1}?", "answer": "#### 2"}) == expected
    assert build_prompt("MATH", {"problem": "What is {1+1}?", "solution": "\\boxed{2}"}) == expected


def test_instruct_prompt_exact():
    assert build_prompt("alpaca_eval", {"instruction": "Hi"}) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Hi ASSISTANT:"
    )


def test_code_prompt_has_three_newlines_and_tabs():
    prompt = build_prompt("human_eval", {"prompt": "def f():\n    return 1\n"})
    assert prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n\n### Instruction:\nCreate a Python script for this problem:\ndef f():\n\treturn 1\n"
        "\n\n### Response:"
    )


def test_mbpp_prompt_and_task_493_quirk():
    record = {"task_id": 11, "text": "Do x.", "test_list": ["assert f(1) == 1", "assert f(2) == 2", "assert 1"]}
    assert mbpp_prompt_text(record) == "\nDo x.\nTest examples:\nassert f(1) == 1\nassert f(2) == 2\nassert 1"
    quirk = dict(record, task_id=493)
    assert mbpp_prompt_text(quirk) == "\nDo x.\nTest examples:\ncalculate_polygons(startx, starty, endx, endy, radius)"
    assert build_prompts("mbpp", [record])[0].endswith("Create a Python script for this problem:\n" +
                                                       mbpp_prompt_text(record) + "\n\n### Response:")


def test_package_import_is_light():
    import subprocess
    import sys

    code = "import sys, evaluation; assert 'torch' not in sys.modules and 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
