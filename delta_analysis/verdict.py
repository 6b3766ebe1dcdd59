"""A verdict per fine-tuned model in the paper's terms, always with the numbers and thresholds behind it.

Yu et al. 2023 ("Language Models are Super Mario", arXiv:2311.03099): supervised fine-tuning leaves deltas small
("typically within 0.002"; 0.005 in the paper's first version) and DARE works exactly then; after continued
pre-training deltas "can rapidly reach around 0.03" and DARE fails (WizardCoder-Python-13B against Llama-2-13b
instead of its real base CodeLlama-13b-Python: deltas often above 0.01, and dropping 10 % takes HumanEval/MBPP
from 63.41/55.4 to 0/0).

Rules, checked in order over the whole model:

1. ``not_derived`` when the cosine between fine-tuned and base weight matrices (tensors of 2+ dimensions) is below
   ``NOT_DERIVED_COSINE = 0.5``. Independently initialised weights have cosine ~0 (relative change ~sqrt(2));
   fine-tunes, even after long continued pre-training, keep most of the base's direction. For equal norms,
   cosine 0.5 is a relative change ||d|| / ||base|| of exactly 1: the delta is as large as the weights. Vectors
   (norm scales, biases) are left out: they start as ones/zeros in every model, so unrelated models agree there.
2. ``large`` when the 90th percentile of |delta| exceeds ``LARGE_P90 = 0.01``: more than 10 % of deltas above
   0.01, the paper's WizardCoder-vs-Llama-2 case; DARE at high drop rates is likely harmful.
3. ``sft_like`` when the 90th percentile of |delta| is at most ``SFT_P90 = 0.005`` (the paper's SFT range):
   DARE is expected to be safe.
4. ``borderline`` otherwise (90th percentile in (0.005, 0.01]): above the SFT range but below the failing case;
   evaluate a low drop rate before a high one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

NOT_DERIVED_COSINE = 0.5
LARGE_P90 = 0.01
SFT_P90 = 0.005
PAPER = "Yu et al. 2023, arXiv:2311.03099"

LABELS: dict[str, str] = {
    "not_derived": "not derived from this base",
    "large": "large deltas (continued pre-training?): DARE at high rates likely harmful",
    "borderline": "deltas above the SFT range: try a low DARE rate and evaluate before a high one",
    "sft_like": "SFT-like deltas: DARE expected safe",
}


@dataclass(frozen=True)
class Verdict:
    """``code`` (a ``LABELS`` key), its label, the reason with numbers, and the figures it used."""

    code: str
    label: str
    reason: str
    figures: Mapping[str, float | None]

    def to_dict(self) -> dict:
        return {"code": self.code, "label": self.label, "reason": self.reason, "figures": dict(self.figures),
                "thresholds": {"not_derived_weight_cosine_below": NOT_DERIVED_COSINE, "large_p90_above": LARGE_P90,
                               "sft_p90_at_most": SFT_P90, "source": PAPER}}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def judge(overall: Mapping, matrices: Mapping) -> Verdict:
    """The verdict from a model's whole-model summary and its summary over weight matrices.

    Args:
        overall: ``statistics.model_summary`` over every analysed tensor (uses the 90th percentile of |delta|).
        matrices: the same over tensors of 2+ dimensions (uses the weight cosine); may have ``numel`` 0.
    """
    p90 = overall["quantiles_abs"]["90"]
    cosine = matrices["weight_cosine"] if matrices["numel"] else overall["weight_cosine"]
    figures = {"p90_abs_delta": p90, "weight_cosine_matrices": cosine,
               "relative_change": overall["relative_change"],
               "fraction_above_0.01": overall["fraction_above"]["0.01"], "max_abs_delta": overall["max_abs"]}
    numbers = (f"90th percentile |delta| {_fmt(p90)}, weight cosine {_fmt(cosine)}, relative change "
               f"{_fmt(overall['relative_change'])}, {_fmt(100 * (overall['fraction_above']['0.01'] or 0))} % of "
               f"|delta| above 0.01, max |delta| {_fmt(overall['max_abs'])}")
    if cosine is not None and cosine < NOT_DERIVED_COSINE:
        code, why = "not_derived", f"weight cosine {_fmt(cosine)} < {NOT_DERIVED_COSINE} (independent weights: ~0)"
    elif p90 is not None and p90 > LARGE_P90:
        code, why = "large", f"90th percentile |delta| {_fmt(p90)} > {LARGE_P90} (paper: continued pre-training ~0.03)"
    elif p90 is not None and p90 <= SFT_P90:
        code, why = "sft_like", f"90th percentile |delta| {_fmt(p90)} <= {SFT_P90} (paper's SFT range 0.002-0.005)"
    else:
        code, why = "borderline", f"90th percentile |delta| {_fmt(p90)} in ({SFT_P90}, {LARGE_P90}]"
    return Verdict(code, LABELS[code], f"{why}; {numbers}", figures)
