"""``analysis.json``, ``summary.md`` and the plots of a ``DeltaAnalysis``, written atomically into one folder."""

from __future__ import annotations

from pathlib import Path

from common.run_dir import atomic_write_json, atomic_write_text
from delta_analysis.analysis import DeltaAnalysis
from delta_analysis.histogram import QUANTILE_RELATIVE_ERROR
from delta_analysis.plots import write_plots
from delta_analysis.statistics import THRESHOLDS

ANALYSIS_JSON, SUMMARY_MD = "analysis.json", "summary.md"


def _f(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.3g} %"


def _model_section(model) -> list[str]:
    o = model.overall
    q = o["quantiles_abs"]
    lines = [f"### {model.name}", "", f"**Verdict: {model.verdict.label}.** {model.verdict.reason}.", "",
             "| numel | p50 | p90 | p99 | p99.9 | max | " + " | ".join(f"> {t}" for t in THRESHOLDS)
             + " | relative change | weight cosine |",
             "|---" * (8 + len(THRESHOLDS)) + "|",
             f"| {o['numel']} | {_f(q['50'])} | {_f(q['90'])} | {_f(q['99'])} | {_f(q['99.9'])} | "
             f"{_f(o['max_abs'])} | "
             + " | ".join(_pct(o["fraction_above"][str(t)]) for t in THRESHOLDS)
             + f" | {_f(o['relative_change'])} | {_f(o['weight_cosine'], 6)} |", "",
             "| layer | p90 | max | > 0.01 | relative change | weight cosine |", "|---|---|---|---|---|---|"]
    for group, s in model.layers.items():
        lines.append(f"| {group} | {_f(s['quantiles_abs']['90'])} | {_f(s['max_abs'])} | "
                     f"{_pct(s['fraction_above']['0.01'])} | {_f(s['relative_change'])} | "
                     f"{_f(s['weight_cosine'], 6)} |")
    u = model.unmatched
    if u["name_mapping"]:
        lines += ["", f"Names: {u['name_mapping']}."]
    for key, text in (("only_in_base", "base tensors not analysed"), ("only_in_finetuned", "fine-tuned-only tensors")):
        if u[key]:
            lines += ["", f"{len(u[key])} {text} (unmatched): {', '.join(u[key][:10])}"
                      + (" ..." if len(u[key]) > 10 else "")]
    return lines + [""]


def _pairs_section(result: DeltaAnalysis) -> list[str]:
    if not result.pairs:
        return []
    lines = ["## Between fine-tuned models", "",
             "Sign conflict: both deltas nonzero and of opposite signs (fraction of all coordinates; of those "
             "where both are nonzero).", "", "| models | task-vector cosine | sign conflict | of both nonzero |",
             "|---|---|---|---|"]
    for pair in result.pairs:
        o = pair["overall"]
        lines.append(f"| {' vs '.join(pair['models'])} | {_f(o['cosine'])} | {_pct(o['sign_conflict_fraction'])} | "
                     f"{_pct(o['sign_conflict_fraction_of_both_nonzero'])} |")
    return lines + ["", "Per layer: `analysis.json` (`pairs[].layers`) and `sign_conflict_per_layer.png`.", ""]


def summary_markdown(result: DeltaAnalysis) -> str:
    """The human-readable report: verdicts with their numbers, per-layer tables, pairs, notes, definitions."""
    lines = [f"# Delta analysis against {result.pretrained}", "", "## Verdicts", ""]
    lines += [f"* **{m.name}**: {m.verdict.label} ({m.verdict.reason})." for m in result.models]
    lines += ["", "Thresholds (Yu et al. 2023, arXiv:2311.03099): SFT deltas typically within 0.002 (0.005 in the "
              "first version); WizardCoder-Python against Llama-2 (a continued pre-training, DARE fails): often "
              "above 0.01; continued pre-training: around 0.03. Not derived: weight cosine below 0.5 (relative "
              "change about 1 or more).", "", "## Per model", ""]
    for model in result.models:
        lines += _model_section(model)
    lines += _pairs_section(result)
    if result.notes:
        lines += ["## Notes", ""] + [f"* {n}" for n in result.notes] + [""]
    lines += ["## Definitions", "", f"Quantiles come from an exact histogram with one bin per bfloat16 value: "
              f"error at most half a bin, {QUANTILE_RELATIVE_ERROR:.3g} of the value; counts above thresholds and "
              "the max are exact. Full precision and per-tensor figures: `analysis.json`.", ""]
    return "\n".join(lines)


def write_report(result: DeltaAnalysis, output_dir: Path) -> list[Path]:
    """Write ``analysis.json``, ``summary.md`` and the PNG plots; returns the written paths."""
    atomic_write_json(output_dir / ANALYSIS_JSON, result.to_dict())
    atomic_write_text(output_dir / SUMMARY_MD, summary_markdown(result))
    return [output_dir / ANALYSIS_JSON, output_dir / SUMMARY_MD, *write_plots(result, output_dir)]
