"""Hyperparameter declarations: every setting of a merge is declared once, here or in its method's registry line.

A :class:`Hyperparameter` holds a setting's name, kind, default (with the reason for it), valid range or choices,
one-line help, and its grid values per protocol. Everything else is derived from these declarations: the
validation of a :class:`~model_merging_methods.recipe.Recipe`, the flags of every command line
(``cli.recipe_flags``), the GLUE and LLM grids, run-folder names and the records.

DARE's settings (:data:`DARE_HYPERPARAMETERS`) are declared the same way.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

#: grid protocols: the paper's GLUE grid (MergeLM's merge_plms_glue.py), the CPU reproduction's subset of it, a
#: small smoke grid, and the paper's Table 1 LLM grid (first author, MergeLM issues 21, 39, 44).
PROTOCOLS = ("glue_paper", "glue_reduced", "glue_quick", "llm_table1")

Kind = Literal["number", "rate", "rate_inclusive", "bool", "choice", "count", "seed"]


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


#: a ``cli_default`` that is not set: the command line's default is the library's.
UNSET: Any = _Unset()


def unknown_name_error(kind: str, name: object, choices: Sequence[str], *, context: str = "") -> ValueError:
    """``ValueError("unknown <kind> 'x'<context>. Did you mean: y? Available: a, b, c")``."""
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    hint = f" Did you mean: {close[0]}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}{context}.{hint} Available: {', '.join(sorted(choices))}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> Any:
    """``value`` when it is one of ``choices``; otherwise ``unknown_name_error``."""
    if value not in choices:
        raise unknown_name_error(name, value, tuple(choices))
    return value


@dataclass(frozen=True)
class Hyperparameter:
    """One setting of a merge method (or of DARE).

    Attributes:
        name: the library's name (MergeLM's ``merging_models`` keyword), also the recipe's and the folder name's.
        kind: ``number`` (finite float, at least ``minimum`` if set), ``rate`` (in [0, 1)), ``rate_inclusive``
            (in [0, 1]), ``bool``, ``choice`` (one of ``choices``), ``count`` (integer >= 1), ``seed`` (>= 0).
        default: the library's default; ``required`` settings have none.
        help: one line for every command line.
        why: the reason for the default, stated once.
        choices: for ``choice``.
        minimum: for ``number``.
        per_model: one value for every model, or a list with one per fine-tuned model.
        optional: ``None`` is a valid value (``default`` None: derived, e.g. 1/M per model).
        required: no default: a recipe must give it.
        grids: ``{protocol: values}`` searched by that protocol (see ``PROTOCOLS``).
        statistics: for a setting of the Fisher / Gram statistics (computed by the caller, never passed to
            ``merge``): the keyword it is passed as to the method's statistics function (``compute_statistics``),
            e.g. ``num_examples``; empty for every other setting.
        run_per_value: several values on a command line are separate runs (one folder each), never a search.
        cli_flag: the command-line flag when MergeLM named it differently (``nums_fisher_examples``).
        cli_default: MergeLM's command-line default where it differs from the library's.
        store_true: MergeLM's flag is ``store_true``: absent means False on every command line.
    """

    name: str
    kind: Kind
    default: Any = None
    help: str = ""
    why: str = ""
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    per_model: bool = False
    optional: bool = False
    required: bool = False
    grids: Mapping[str, tuple] = field(default_factory=dict)
    statistics: str = ""
    run_per_value: bool = False
    cli_flag: str | None = None
    cli_default: Any = UNSET
    store_true: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "grids", MappingProxyType({k: tuple(v) for k, v in self.grids.items()}))
        unknown = set(self.grids) - set(PROTOCOLS)
        if unknown:
            raise ValueError(f"{self.name}: grid protocols must be among {', '.join(PROTOCOLS)}, got "
                             f"{sorted(unknown)}")
        if not self.required:
            self.check(self.default, where="the declared default of ")
        for protocol, values in self.grids.items():
            for value in values:
                self.check(value, where=f"the {protocol} grid of ")

    @property
    def flag(self) -> str:
        """The command-line flag name (without ``--``)."""
        return self.cli_flag or self.name

    @property
    def command_line_default(self) -> Any:
        """MergeLM's command-line default: ``cli_default`` where set, False for ``store_true``, else ``default``."""
        if self.store_true:
            return False
        return self.default if self.cli_default is UNSET else self.cli_default

    def python_type(self) -> type:
        """The type a command line converts a value to."""
        return {"number": float, "rate": float, "rate_inclusive": float, "count": int, "seed": int,
                "choice": str, "bool": bool}[self.kind]

    def check(self, value: Any, *, num_models: int | None = None, where: str = "") -> Any:
        """The validated value (numbers as float, per-model lists as tuples); ValueError saying what is wrong.

        Args:
            value: the value given.
            num_models: with ``per_model``, the length a list must have (None: not checked yet).
            where: prefix of the error's subject, e.g. ``"ties_merging's "``.
        """
        if value is None and self.optional:
            return None
        if self.per_model and isinstance(value, (list, tuple)):
            if num_models is not None and len(value) != num_models:
                raise ValueError(f"{where}{self.name} needs one value per fine-tuned model ({num_models}), got "
                                 f"{len(value)}: {list(value)!r}; pass one value for all models or one per model")
            if not value:
                raise ValueError(f"{where}{self.name} needs at least one value, got an empty list")
            return tuple(self._check_one(v, where) for v in value)
        return self._check_one(value, where)

    def _check_one(self, value: Any, where: str) -> Any:
        subject = f"{where}{self.name}"
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{subject} must be True or False, got {value!r}")
            return value
        if self.kind == "choice":
            if value not in self.choices:
                owner = where.removesuffix("'s ").removeprefix("the ")
                raise unknown_name_error(self.name, value, self.choices, context=f" for {owner}" if owner else "")
            return value
        if self.kind in ("count", "seed"):
            low = 1 if self.kind == "count" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{subject} must be an integer >= {low}, got {value!r}")
            return value
        number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if not number and self.kind not in ("rate", "rate_inclusive"):
            raise ValueError(f"{subject} must be a finite number, got {value!r}")
        value = float(value) if number else value
        if self.kind == "rate" and not (number and 0 <= value < 1):
            raise ValueError(f"{subject} must be in [0, 1), got {value!r}; 1.0 would drop every value (and divide "
                             "by zero with rescaling)")
        if self.kind == "rate_inclusive" and not (number and 0 <= value <= 1):
            raise ValueError(f"{subject} must be in [0, 1], got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{subject} must be >= {self.minimum}, got {value!r}")
        return value


def by_name(specs: Sequence[Hyperparameter]) -> dict[str, Hyperparameter]:
    """``{name: declaration}``; two declarations of one name are an error."""
    out: dict[str, Hyperparameter] = {}
    for spec in specs:
        if spec.name in out:
            raise ValueError(f"hyperparameter {spec.name!r} is declared twice")
        out[spec.name] = spec
    return out


_TABLE1_RATES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

#: DARE: drop each delta with probability p and rescale the survivors by 1/(1-p) (``mask_merging`` in MergeLM).
DARE_HYPERPARAMETERS: tuple[Hyperparameter, ...] = (
    Hyperparameter(
        "weight_mask_rate", "rate", required=True, per_model=True, cli_default=0.1,
        help="DARE drop rate p in [0, 1)",
        why="no library default: the drop rate is the experiment (MergeLM's command lines default to 0.1)",
        grids={"glue_paper": (0.1, 0.3, 0.5, 0.7, 0.9), "glue_reduced": (0.1, 0.5, 0.9), "glue_quick": (0.5, 0.9),
               "llm_table1": _TABLE1_RATES},
    ),
    Hyperparameter(
        "use_weight_rescale", "bool", True, store_true=True,
        help="rescale the kept values by 1/(1-p) (DARE); without it, DropOnly. On the command line it is MergeLM's "
             "store_true flag: absent means DropOnly",
        why="DARE is drop and rescale; DropOnly is the ablation",
    ),
    Hyperparameter(
        "rescale_factor", "number", None, optional=True, minimum=0.0,
        help="multiply the kept values by this instead of 1/(1-p) (DAREx's 1/q; needs --use_weight_rescale); "
             "unset: 1/(1-p), the paper's",
        why="the paper's rescale 1/(1-p) keeps each delta's expectation; DAREx (arXiv 2410.09344) shows a "
            "smaller factor recovers accuracy at p >= 0.99",
    ),
    Hyperparameter(
        "mask_strategy", "choice", "random", choices=("random", "magnitude"),
        help="random: DARE's Bernoulli drop; magnitude: drop each tensor's smallest |values|",
        why="DARE's drop is random",
    ),
    Hyperparameter(
        "weight_format", "choice", "delta_weight", choices=("delta_weight", "finetuned_weight"),
        help="drop deltas (delta_weight, DARE) or the fine-tuned weights themselves (finetuned_weight)",
        why="DARE drops deltas; dropping fine-tuned weights is the paper's counter-example",
    ),
    Hyperparameter(
        "seed", "seed", 0, run_per_value=True,
        help="seed of the DARE masks (a mask is a function of seed, model and parameter name)",
        why="any fixed seed reproduces; 0 by convention",
    ),
)
DARE_SPECS: Mapping[str, Hyperparameter] = MappingProxyType(by_name(DARE_HYPERPARAMETERS))
