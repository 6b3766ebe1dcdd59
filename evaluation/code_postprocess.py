"""Post-processing of code completions for HumanEval and MBPP, exactly as MergeLM does it.

MergeLM (``inference_llms_instruct_math_code.py``, ``test_human_eval`` / ``test_mbpp``) keeps the text after
the last ``"### Response:"``, turns tabs back into 4 spaces, then cleans the completion with a fixed chain of
string rules (markdown fences, ``__main__`` blocks, "# Example usage", and the code-alpaca
"The solution is:" / "The answer is:" forms). The chain is reproduced rule by rule, including its quirks:
``str.replace`` removes *every* occurrence of a marker, so the later search for ``"\\n\\nThe answer is:"``
can never succeed.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

RESPONSE_MARKER = "### Response:"


def completion_from_generation(text: str) -> str:
    """The part of a raw generation MergeLM treats as the completion: after the last ``"### Response:"``,
    tabs replaced by 4 spaces (the prompt had 4 spaces replaced by tabs).

    Args:
        text: the raw generated text (vLLM output, prompt not included).

    Returns:
        The completion before post-processing.
    """
    return text.split(RESPONSE_MARKER)[-1].replace("\t", "    ")


def _cut_fence(completion: str, closing: str) -> str:
    start = completion.index("```python")
    completion = completion[start:].strip().replace("```python", "")
    if closing not in completion:
        logger.info("wrong completion: no closing %r after ```python", closing)
        return completion
    return completion[:completion.index(closing)].strip()


def _cut_before(completion: str, marker: str) -> str:
    if marker not in completion:
        return completion
    return completion[:completion.index(marker)].strip()


def _keep_after(completion: str, marker: str) -> str:
    """code-alpaca handling: keep what follows ``marker`` (every occurrence removed)."""
    if marker not in completion:
        return completion
    completion = completion[completion.index(marker):].strip().replace(marker, "")
    if "\n\nThe answer is:" in completion:
        return completion[:completion.index("\n\nThe answer is:")].strip()
    return completion.strip()


def _common_tail(completion: str, extra_cut_markers: tuple[str, ...]) -> str:
    if '__name__ == "__main__"' in completion:
        completion = _cut_before(completion, 'if __name__ == "__main__":')
    completion = _cut_before(completion, "# Example usage")
    for marker in extra_cut_markers:
        completion = _cut_before(completion, marker)
    completion = _keep_after(completion, "The solution is:")
    return _keep_after(completion, "The answer is:")


def postprocess_humaneval_completion(completion: str) -> str:
    """Clean a HumanEval completion (MergeLM ``test_human_eval``).

    Remove ``\\r``, strip; a ``````python`` block is kept up to the next ``````; cut before
    ``if __name__ == "__main__":`` and ``# Example usage``; then the code-alpaca ``The solution is:`` and
    ``The answer is:`` rules. The harness then executes ``prompt + completion``.

    Args:
        completion: output of :func:`completion_from_generation`.

    Returns:
        The cleaned completion.
    """
    completion = completion.replace("\r", "").strip()
    if "```python" in completion:
        completion = _cut_fence(completion, "```")
    return _common_tail(completion, ())


def postprocess_mbpp_completion(completion: str) -> str:
    """Clean an MBPP completion (MergeLM ``test_mbpp``).

    Same chain as :func:`postprocess_humaneval_completion` except: no ``\\r`` removal, the closing fence is
    ``"\\n```"``, and the text is also cut before ``# Test examples``.

    Args:
        completion: output of :func:`completion_from_generation`.

    Returns:
        The cleaned completion (a full program; the tests are appended to it).
    """
    completion = completion.strip()
    if "```python" in completion:
        completion = _cut_fence(completion, "\n```")
    return _common_tail(completion, ("# Test examples",))
