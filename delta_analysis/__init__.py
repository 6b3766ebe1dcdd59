"""Know before you merge: streaming delta statistics, verdicts in the paper's terms, and a homology preflight.

    from delta_analysis import analyze_deltas, analyze_state_dicts, check_homology
    result = analyze_deltas("base_folder_or_hub_id", ["finetuned_a", "finetuned_b"])
    result.verdicts()["finetuned_a"].label      # e.g. "SFT-like deltas: DARE expected safe"
    result.to_dict()                            # what analysis.json holds
"""

from delta_analysis.analysis import DeltaAnalysis, ModelDeltas, analyze_deltas, analyze_state_dicts
from delta_analysis.preflight import HomologyError, check_homology
from delta_analysis.statistics import THRESHOLDS
from delta_analysis.verdict import LABELS, Verdict

__all__ = ["LABELS", "THRESHOLDS", "DeltaAnalysis", "HomologyError", "ModelDeltas", "Verdict", "analyze_deltas",
           "analyze_state_dicts", "check_homology"]
