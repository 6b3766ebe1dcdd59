"""Know before you merge: |delta| distribution, relative change, task-vector cosine / sign conflicts and a verdict.

Example:
    python analyze_deltas.py --pretrained_model meta-llama/Llama-2-13b-hf \
        --finetuned_models WizardLMTeam/WizardLM-13B-V1.2 WizardLMTeam/WizardMath-13B-V1.0 \
        --output_dir results/analyze_deltas/llama-2-13b

Streams one row block per model at a time (a 70B family needs a few GB of RAM). Writes ``analysis.json`` (full
precision), ``summary.md`` and PNG plots into ``--output_dir``. Verdicts and thresholds (Yu et al. 2023,
arXiv:2311.03099) are explained in ``delta_analysis/verdict.py`` and the README section "Delta analysis before
merging". ``--pretrained_model all-MiniLM-L6-v2`` is the encoder the GLUE scripts use.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from cli.native_libraries import limit_blas_threads, tune_malloc_for_delta_analysis

limit_blas_threads()  # before NumPy/SciPy are imported

from common.logging_setup import setup_logging  # noqa: E402
from common.run_dir import prepare_run_dir  # noqa: E402
from delta_analysis import DeltaAnalysis, analyze_deltas  # noqa: E402
from delta_analysis.report import write_report  # noqa: E402
from glue.encoder_models import resolve_model_name  # noqa: E402

logger = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model", required=True, help="base model folder or hub id")
    p.add_argument("--finetuned_models", nargs="+", required=True, help="fine-tuned model folders or hub ids")
    p.add_argument("--output_dir", required=True, help="where analysis.json, summary.md and the plots go")
    p.add_argument("--overwrite", action="store_true", help="replace the files of a non-empty output_dir")
    p.add_argument("--num_threads", type=int, help="worker threads (default: CPU count, at most 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> DeltaAnalysis:
    args = parse_args(argv)
    tune_malloc_for_delta_analysis()
    output_dir = Path(args.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{output_dir} is not empty; pass --overwrite to replace its files")
    setup_logging()
    logger.info("argv: %s", " ".join(sys.argv))
    names = [args.pretrained_model, *args.finetuned_models]
    models = [resolve_model_name(m) for m in names]
    result = analyze_deltas(models[0], models[1:], num_threads=args.num_threads, progress=not args.quiet,
                            labels=names)  # report the names as given, not machine-specific resolved folders
    written = write_report(result, prepare_run_dir(output_dir, overwrite=args.overwrite))
    for model in result.models:
        print(f"{model.name}: {model.verdict.label} ({model.verdict.reason})")
    print(f"wrote {', '.join(p.name for p in written)} to {output_dir}")
    return result


if __name__ == "__main__":
    main()
