"""AlpacaEval win rates from the output of the ``alpaca_eval`` CLI (tatsu-lab/alpaca_eval), checked against our files.

AlpacaEval is judged outside the repository (the paper: ChatGPT as the judge, ``--annotators_config chatgpt_fn``).
A run writes the judge's input, ``external/alpaca_eval_model_outputs.json`` (``evaluation.output_formats``); the
CLI (:func:`alpaca_eval_command`) writes into its ``--output_path`` folder (newer versions: into a subfolder named
after the annotators config, e.g. ``<output_path>/chatgpt_fn/``):

* ``annotations.json``: a JSON list of records ``instruction``, ``output_1`` (the reference's output),
  ``generator_1``, ``output_2`` (the model's output), ``generator_2``, ``annotator``, ``preference`` (1 = the
  reference is preferred, 2 = the model, 1.5 or 0 = a draw, fractional for weighted judges, missing/NaN when the
  judge gave no answer), ...;
* ``leaderboard.csv``: one row per model (first, unnamed column: its name) with ``win_rate``, ``standard_error``
  (both in percent), ``n_wins``, ``n_wins_base``, ``n_draws``, ``n_total`` and, for AlpacaEval 2,
  ``length_controlled_winrate``.

Both are read. ``annotations.json`` is preferred: the win rate is recomputed from its preferences exactly as
``alpaca_eval.metrics.get_winrate`` does (0 -> 1.5; preferences outside [1, 2] or missing are dropped; win rate =
mean(preference - 1) x 100, standard error = its standard error of the mean x 100, ddof 1), and every record is
matched to our outputs (same instructions, same count, the model's output as ``output_2``), so annotations of
another run, point or part are refused. ``leaderboard.csv`` alone can only be checked by its count (``n_total``
must not exceed the outputs; fewer is accepted with a warning: preferences the judge did not give).

Where a score goes. Every LLM run that evaluates AlpacaEval writes ``<folder>/external/
alpaca_eval_model_outputs.json``; its score goes where the tables and the selection read it
(:class:`AlpacaEvalTarget`):

* a run of the LLM scripts (single model, DARE, merge, direct inference; ``<folder>`` = the run folder):
  ``metrics.json``'s ``alpaca_eval`` entry gets ``win_rate`` (percent), ``standard_error``, ``n_total``, ...;
* a grid point's validation run (``<grid>/points/<key>/validation/validation``):
  ``<grid>/external_scores/alpaca_eval.json``, ``{"<point key>": {"win_rate": ..., ...}}``, read by the selection
  (``llms.llm_grid_search.external_scores``);
* a selected point's final run (``<grid>/points/<key>/final/<part>``, part = validation / test / full): the
  part's entry of ``<grid>/points/<key>/final/alpaca_eval.json``, read by the Table 1 printout
  (``llms.paper_table1``) and by the selection's tables when ``--stage select`` runs again.

:func:`ingest` checks the annotations against the folder's model outputs first and refuses a different score
already ingested unless ``overwrite``; :func:`pending` lists every model outputs file without a score with the
``alpaca_eval`` call and the ingestion command for it (``evaluate_generations.py --pending_alpaca_eval``).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import logging
import math
import os
import shlex
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.run_dir import atomic_write_json, read_json

logger = logging.getLogger(__name__)

ANNOTATIONS_FILE = "annotations.json"
LEADERBOARD_FILE = "leaderboard.csv"
#: MergeLM's README: ``alpaca_eval --model_outputs FILE --annotators_config chatgpt_fn`` (ChatGPT as the judge)
DEFAULT_ANNOTATORS_CONFIG = "chatgpt_fn"
#: leaderboard.csv columns kept with the score (when present)
LEADERBOARD_FIELDS = ("n_wins", "n_wins_base", "n_draws", "length_controlled_winrate", "lc_standard_error",
                      "discrete_win_rate", "avg_length")


class AlpacaEvalMismatchError(ValueError):
    """The AlpacaEval output does not belong to the run's model outputs (other instructions, count or outputs)."""


@dataclass(frozen=True)
class AlpacaEvalScore:
    """A model's AlpacaEval result.

    Attributes:
        win_rate: percent (0-100), the paper's AlpacaEval number.
        standard_error: percent (``None`` with a single judged example).
        n_total: judged examples (preferences in [1, 2]).
        source: the file it was read from.
        extra: ``n_wins``, ``n_wins_base``, ``n_draws``, ``n_missing`` (annotations without a preference), the
            judges (``annotator``) and the reference (``generator_1``) of annotations, ``length_controlled_winrate``
            of a leaderboard (AlpacaEval 2) ...
    """

    win_rate: float
    standard_error: float | None
    n_total: int
    source: str
    extra: Mapping[str, Any]

    def metrics(self) -> dict[str, Any]:
        """The fields written into a run's metrics (``win_rate`` in percent: read as is, not x100)."""
        return {"win_rate": self.win_rate, "standard_error": self.standard_error, "n_total": self.n_total,
                **self.extra, "alpaca_eval_output": self.source}


def _preference(value: Any) -> float | None:
    """alpaca_eval's preference: 0 -> 1.5 (draw); ``None`` for a missing one or one outside [1, 2]."""
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    value = 1.5 if value == 0 else value
    return value if 1 <= value <= 2 else None  # NaN fails both comparisons


def win_rate_from_preferences(preferences: Sequence[Any]) -> dict[str, Any]:
    """``win_rate``, ``standard_error`` (percent), ``n_wins``, ``n_wins_base``, ``n_draws``, ``n_total``,
    ``n_missing`` as ``alpaca_eval.metrics.get_winrate`` (``AbsoluteScoringRule.describe_head2head``)."""
    valid = [p for p in (_preference(v) for v in preferences) if p is not None]
    n = len(valid)
    if n == 0:
        raise ValueError(f"no preference in [1, 2] among {len(preferences)} annotations; the judge gave no answer")
    scores = [p - 1 for p in valid]
    mean = sum(scores) / n
    sem = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n) if n > 1 else None
    return {"win_rate": mean * 100, "standard_error": None if sem is None else sem * 100,
            "n_wins": sum(s > 0.5 for s in scores), "n_wins_base": sum(s < 0.5 for s in scores),
            "n_draws": sum(p == 1.5 for p in valid), "n_total": n, "n_missing": len(preferences) - n}


def read_annotations(path: str | os.PathLike) -> tuple[AlpacaEvalScore, list[dict[str, Any]]]:
    """The score of an ``annotations.json`` and its records."""
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(records, list) or not all(isinstance(r, Mapping) for r in records):
        raise ValueError(f"{path}: an alpaca_eval annotations file is a JSON list of records, got "
                         f"{type(records).__name__}")
    for record in records:
        if "instruction" not in record or "preference" not in record:
            raise ValueError(f"{path}: every annotation needs 'instruction' and 'preference' (alpaca_eval's "
                             f"annotations.json), got keys {sorted(record)}")
    counts = win_rate_from_preferences([r["preference"] for r in records])
    if counts["n_missing"]:
        logger.warning("%s: %d of %d annotations have no preference (the judge gave none); the win rate is over "
                       "the other %d, as alpaca_eval computes it", path, counts["n_missing"], len(records),
                       counts["n_total"])
    extra = {k: counts[k] for k in ("n_wins", "n_wins_base", "n_draws", "n_missing")}
    for field, name in (("annotator", "annotators"), ("generator_1", "reference")):
        found = sorted({str(r[field]) for r in records if r.get(field) is not None})
        if found:
            extra[name] = found
    score = AlpacaEvalScore(counts["win_rate"], counts["standard_error"], counts["n_total"], str(path), extra)
    return score, list(records)


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return None if value is None or math.isnan(value) else value


def read_leaderboard(path: str | os.PathLike, name: str | None = None) -> AlpacaEvalScore:
    """The row ``name`` of a ``leaderboard.csv`` (the only row when ``name`` is None or absent and there is one)."""
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "win_rate" not in rows[0]:
        raise ValueError(f"{path}: an alpaca_eval leaderboard.csv has a win_rate column, got "
                         f"{list(rows[0]) if rows else 'no rows'}")
    index = next(iter(rows[0]))  # pandas' unnamed index column: the model names
    by_name = {row[index]: row for row in rows}
    if name is not None and name in by_name:
        row = by_name[name]
    elif len(rows) == 1:
        row = rows[0]
    else:
        wanted = f"no row named {name!r}" if name is not None else "no --alpaca_eval_name"
        raise ValueError(f"{path}: {len(rows)} models in the leaderboard and {wanted}; pass --alpaca_eval_name "
                         f"(one of {', '.join(map(repr, by_name))}) or run alpaca_eval with "
                         "--precomputed_leaderboard None (one row)")
    win_rate, n_total = _number(row.get("win_rate")), _number(row.get("n_total"))
    if win_rate is None or n_total is None:
        raise ValueError(f"{path}: row {row[index]!r} needs win_rate and n_total, got {dict(row)}")
    extra = {k: _number(row.get(k)) for k in LEADERBOARD_FIELDS if _number(row.get(k)) is not None}
    extra = {k: int(v) if k.startswith("n_") else v for k, v in extra.items()}
    return AlpacaEvalScore(win_rate, _number(row.get("standard_error")), int(n_total), str(path),
                           {**extra, "leaderboard_name": row[index]})


def find_output_file(path: str | os.PathLike) -> Path:
    """``path`` itself (a file), or the ``annotations.json`` (else ``leaderboard.csv``) in the folder ``path`` or in
    one of its subfolders (alpaca_eval writes into ``<output_path>/<annotators_config>/`` since version 0.5)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder; pass alpaca_eval's annotations.json, its "
                                "leaderboard.csv or the --output_path folder it wrote them into")
    for name in (ANNOTATIONS_FILE, LEADERBOARD_FILE):
        found = [path / name] if (path / name).is_file() else sorted(path.glob(f"*/{name}"))
        if len(found) > 1:
            raise ValueError(f"{path}: {len(found)} {name} files ({', '.join(map(str, found))}); pass one of them")
        if found:
            return found[0]
    raise FileNotFoundError(f"{path}: no {ANNOTATIONS_FILE} or {LEADERBOARD_FILE} in it or in a subfolder; has "
                            "alpaca_eval run (see evaluate_generations.py --pending_alpaca_eval)?")


def check_annotations_match(records: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]],
                            source: str, outputs_file: str) -> None:
    """Refuse annotations that are not of ``outputs`` (the run's model outputs): same instructions (as a multiset,
    so the same count) and, per instruction, the model's output as ``output_2`` (whitespace at the ends ignored)."""
    ours, theirs = Counter(o["instruction"] for o in outputs), Counter(r["instruction"] for r in records)
    if ours != theirs:
        missing, extra = sorted((ours - theirs).elements()), sorted((theirs - ours).elements())
        raise AlpacaEvalMismatchError(
            f"{source} does not annotate the outputs of {outputs_file}: {len(records)} annotations for "
            f"{len(outputs)} outputs; {len(missing)} of our instructions not annotated"
            + (f" (first: {missing[0][:80]!r})" if missing else "") + f", {len(extra)} annotated instructions not ours"
            + (f" (first: {extra[0][:80]!r})" if extra else "") + ". Run alpaca_eval on this run's file (see "
            "--pending_alpaca_eval); nothing was written")
    by_instruction: dict[str, list[str]] = {}
    for output in outputs:
        by_instruction.setdefault(output["instruction"], []).append(str(output.get("output", "")).strip())
    differing = [r["instruction"] for r in records if "output_2" in r
                 and str(r["output_2"] if r["output_2"] is not None else "").strip()
                 not in by_instruction[r["instruction"]]]
    if differing:
        raise AlpacaEvalMismatchError(
            f"{source}: the judged model outputs (output_2) differ from {outputs_file} for {len(differing)} of "
            f"{len(records)} instructions (first: {differing[0][:80]!r}): these are annotations of another model, "
            "grid point or part. Nothing was written")


def read_alpaca_eval_output(path: str | os.PathLike, outputs: Sequence[Mapping[str, Any]], outputs_file: str,
                            name: str | None = None) -> AlpacaEvalScore:
    """The score in ``path`` (:func:`find_output_file`), checked against ``outputs`` (the run's model outputs)."""
    found = find_output_file(path)
    if found.suffix == ".csv":
        score = read_leaderboard(found, name)
        if score.n_total > len(outputs):
            raise AlpacaEvalMismatchError(
                f"{found}: n_total {score.n_total} judged examples, but {outputs_file} has {len(outputs)} outputs: "
                "this leaderboard is of another run or part. Nothing was written")
        if score.n_total < len(outputs):
            logger.warning("%s: %d judged examples of %d outputs (the judge gave no preference for the others); "
                           "only the count can be checked with a leaderboard, annotations.json is checked per "
                           "instruction", found, score.n_total, len(outputs))
        return score
    score, records = read_annotations(found)
    check_annotations_match(records, outputs, str(found), outputs_file)
    leaderboard = found.with_name(LEADERBOARD_FILE)
    if leaderboard.is_file():  # written with it: its length-controlled win rate (AlpacaEval 2) is kept
        try:
            board = read_leaderboard(leaderboard, name)
        except ValueError as error:
            logger.warning("%s: not used (%s)", leaderboard, error)
        else:
            if abs(board.win_rate - score.win_rate) > 1e-6:
                logger.warning("%s: win_rate %.4f differs from %.4f recomputed from %s (another fn_metric?); the "
                               "recomputed one is kept", leaderboard, board.win_rate, score.win_rate, found)
            lc = {k: board.extra[k] for k in ("length_controlled_winrate", "lc_standard_error") if k in board.extra}
            score = AlpacaEvalScore(score.win_rate, score.standard_error, score.n_total, score.source,
                                    {**score.extra, **lc})
    return score


def alpaca_eval_command(model_outputs: str | os.PathLike, output_path: str | os.PathLike, name: str,
                        annotators_config: str = DEFAULT_ANNOTATORS_CONFIG) -> str:
    """The ``alpaca_eval`` call for one model outputs file.

    ``IS_ALPACA_EVAL_2=False``: AlpacaEval 1's reference outputs (text-davinci-003) and plain win rate, what the
    paper's 2023 alpaca_eval used (alpaca_eval >= 0.6 defaults to AlpacaEval 2: GPT-4 turbo reference, length
    controlled). ``--precomputed_leaderboard None``: the leaderboard holds this model only and no shared leaderboard
    is written (a cached row of the same name would otherwise be reused instead of judging).
    """
    return (f"IS_ALPACA_EVAL_2=False alpaca_eval --model_outputs {shlex.quote(str(model_outputs))} "
            f"--annotators_config {shlex.quote(annotators_config)} --name {shlex.quote(name)} "
            f"--precomputed_leaderboard None --output_path {shlex.quote(str(output_path))}")


# -------------------------------------------------------------------------------------------------------------------
# Where a score goes in a results tree, ingestion, pending files

DATASET = "alpaca_eval"
MODEL_OUTPUTS_FILE = "alpaca_eval_model_outputs.json"  # llms.llm_pipeline.EXTERNAL_FILES["alpaca_eval"]
OUTPUT_FOLDER = "alpaca_eval"  # alpaca_eval's --output_path, below the folder's external/
FINAL_PARTS = ("validation", "test", "full")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock for a read-modify-write of ``path`` (concurrent ingestions into one file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _grid_point(point: Path) -> tuple[Path, str] | None:
    """``(grid folder, point key)`` of a folder below ``<grid>/points/``, else None."""
    for ancestor in point.parents:
        if ancestor.name == "points":
            return ancestor.parent, point.relative_to(ancestor).as_posix()
    return None


@dataclass(frozen=True)
class AlpacaEvalTarget:
    """A folder holding ``external/alpaca_eval_model_outputs.json`` and where its score goes.

    Attributes:
        kind: ``run`` (a run of the LLM scripts), ``grid validation`` or ``grid final``.
        folder: the folder holding ``external/``.
        grid_dir, point_key, part: for grid points (``part`` of a final run: validation, test or full).
    """

    kind: str
    folder: Path
    grid_dir: Path | None = None
    point_key: str | None = None
    part: str | None = None

    @property
    def model_outputs(self) -> Path:
        return self.folder / "external" / MODEL_OUTPUTS_FILE

    @property
    def output_path(self) -> Path:
        """alpaca_eval's ``--output_path`` for this folder."""
        return self.folder / "external" / OUTPUT_FOLDER

    @property
    def score_file(self) -> Path:
        if self.kind == "run":
            return self.folder / "metrics.json"
        if self.kind == "grid validation":
            return self.grid_dir / "external_scores" / f"{DATASET}.json"
        return self.folder.parent / f"{DATASET}.json"  # <point>/final/alpaca_eval.json

    def describe(self) -> str:
        if self.kind == "run":
            return f"run {self.folder}"
        return f"{self.kind} {self.point_key}" + (f" ({self.part})" if self.kind == "grid final" else "")

    def not_ready(self) -> str | None:
        """Why no score can be written yet (the file that receives it is missing), else None."""
        if self.kind == "run" and not self.score_file.is_file():
            return f"{self.score_file} missing: the run has not finished"
        if self.kind == "run" and DATASET not in read_json(self.score_file):
            return f"{self.score_file} has no {DATASET} entry: the run has not finished its AlpacaEval generations"
        if self.kind == "grid final" and not self.score_file.is_file():
            return (f"{self.score_file} missing: the final run of this point was interrupted; run --stage select "
                    "again first")
        return None

    def current(self) -> dict[str, Any] | None:
        """The ingested score (its metrics record), None while there is none."""
        if not self.score_file.is_file():
            return None
        data = read_json(self.score_file)
        if self.kind == "run":
            entry = data.get(DATASET)
        elif self.kind == "grid validation":
            entry = data.get(self.point_key)
            entry = {"win_rate": float(entry)} if isinstance(entry, (int, float)) else entry  # {key: percent}
        else:
            entry = data.get(self.part)
        return entry if isinstance(entry, Mapping) and isinstance(entry.get("win_rate"), (int, float)) else None

    def write(self, metrics: Mapping[str, Any]) -> None:
        with _locked(self.score_file):
            if self.kind == "grid validation":
                data = read_json(self.score_file) if self.score_file.is_file() else {}
                data[self.point_key] = dict(metrics)
            else:
                data = read_json(self.score_file)
                key = DATASET if self.kind == "run" else self.part
                data[key] = {**(data.get(key) or {}), **metrics}
            atomic_write_json(self.score_file, data)


def target_for(folder: str | os.PathLike) -> AlpacaEvalTarget:
    """The target of a folder holding ``external/alpaca_eval_model_outputs.json`` (see the module docstring)."""
    folder = Path(folder).resolve()
    if not (folder / "external" / MODEL_OUTPUTS_FILE).is_file():
        raise FileNotFoundError(f"{folder / 'external' / MODEL_OUTPUTS_FILE} missing: --run_dir is the folder of a "
                                "run (or of a grid point's validation/validation or final/<part>) that evaluated "
                                "alpaca_eval; evaluate_generations.py --pending_alpaca_eval RESULTS_DIR lists them")
    parent = folder.parent
    is_validation = parent.name == "validation" and folder.name == "validation"
    is_final = parent.name == "final" and folder.name in FINAL_PARTS
    if is_validation or is_final:
        found = _grid_point(parent.parent)
        if found is not None:
            grid_dir, key = found
            if is_validation:
                return AlpacaEvalTarget("grid validation", folder, grid_dir, key)
            return AlpacaEvalTarget("grid final", folder, grid_dir, key, folder.name)
    return AlpacaEvalTarget("run", folder)


def ingest(folder: str | os.PathLike, alpaca_eval_output: str | os.PathLike, *, name: str | None = None,
           overwrite: bool = False) -> dict[str, Any]:
    """Check ``alpaca_eval_output`` (annotations.json, leaderboard.csv or alpaca_eval's output folder) against the
    folder's model outputs and write its score where the tables and the selection read it; returns the metrics."""
    target = target_for(folder)
    reason = target.not_ready()
    if reason is not None:
        raise FileNotFoundError(f"{target.describe()}: {reason}; nothing was written")
    outputs = json.loads(target.model_outputs.read_text(encoding="utf-8"))
    score: AlpacaEvalScore = read_alpaca_eval_output(alpaca_eval_output, outputs, str(target.model_outputs), name)
    metrics = score.metrics()
    old = target.current()
    if old is not None and (old.get("win_rate"), old.get("n_total")) != (metrics["win_rate"], metrics["n_total"]):
        if not overwrite:
            raise ValueError(f"{target.describe()}: a different AlpacaEval score is already ingested "
                             f"(win_rate {old['win_rate']:.2f}, from {old.get('alpaca_eval_output', '?')}), got "
                             f"{metrics['win_rate']:.2f} from {score.source}; pass --overwrite to replace it "
                             "(a selection made with the old score is not redone by this)")
        logger.warning("%s: replacing win_rate %.2f by %.2f (--overwrite)", target.describe(), old["win_rate"],
                       metrics["win_rate"])
    target.write(metrics)
    logger.info("%s: AlpacaEval win rate %.2f (n=%d) written to %s", target.describe(), metrics["win_rate"],
                metrics["n_total"], target.score_file)
    if target.kind == "grid final":
        logger.info("Table 1 (summarize_results.py --paper_table1) reads it now; run --stage select again to refresh "
                    "the selection's own tables (nothing is regenerated)")
    return metrics


def ingest_command(target: AlpacaEvalTarget) -> str:
    return (f"python evaluate_generations.py --dataset_name {DATASET} --run_dir {shlex.quote(str(target.folder))} "
            f"--alpaca_eval_annotations {shlex.quote(str(target.output_path))}")


def pending(results_dir: str | os.PathLike,
            annotators_config: str = DEFAULT_ANNOTATORS_CONFIG) -> list[dict[str, Any]]:
    """Every AlpacaEval model outputs file under ``results_dir`` without an ingested score: ``{"target",
    "alpaca_eval" (the CLI call), "ingest" (the command to run after it), "not_ready" (why no score can be written
    yet, or None)}``, in path order."""
    root = Path(results_dir).resolve()
    found = []
    for path in sorted(root.rglob(f"external/{MODEL_OUTPUTS_FILE}")):
        target = target_for(path.parent.parent)
        if target.current() is not None:
            continue
        name = path.parent.parent.relative_to(root).as_posix() if path.parent.parent != root else root.name
        found.append({"target": target, "not_ready": target.not_ready(),
                      "alpaca_eval": alpaca_eval_command(target.model_outputs, target.output_path, name,
                                                         annotators_config),
                      "ingest": ingest_command(target)})
    return found


def pending_text(results_dir: str | os.PathLike, annotators_config: str = DEFAULT_ANNOTATORS_CONFIG) -> str:
    """:func:`pending` as shell lines: per file a comment, the ``alpaca_eval`` call and the ingestion command."""
    found = pending(results_dir, annotators_config)
    if not found:
        return f"# no AlpacaEval model outputs without a score under {results_dir}\n"
    lines = [f"# {len(found)} AlpacaEval model outputs without a score under {results_dir}; run each alpaca_eval "
             "call (it needs the judge's API key, e.g. OPENAI_API_KEY), then the ingestion command below it"]
    for item in found:
        target = item["target"]
        count = len(json.loads(target.model_outputs.read_text(encoding="utf-8")))
        lines.append(f"\n# {target.describe()}: {count} outputs -> {target.score_file}")
        if item["not_ready"]:
            lines.append(f"# not ready: {item['not_ready']}")
        lines += [item["alpaca_eval"], item["ingest"]]
    return "\n".join(lines) + "\n"
