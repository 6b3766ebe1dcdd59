"""mergekit's YAML merge configurations: parsing, validation and per-tensor parameter resolution.

``python merge_checkpoints.py --config merge.yml`` reads the schema of mergekit 0.1.5 with its meaning, so that a
file from a model card gives the same merge (``docs/mergekit.md``). This module owns everything that can be
decided from the YAML text and the models' headers, before any tensor is read:

* the schema: ``merge_method``, ``base_model``, exactly one of ``models`` / ``slices``, ``parameters``, ``dtype``,
  ``out_dtype``, ``tokenizer_source``; unknown keys, methods and parameters are errors naming the key and the
  nearest valid name (mergekit accepts unknown parameters silently and ignores them);
* values (``evaluate_setting``, mergekit ``config.py``): a scalar; a list of scalars is a gradient, interpolated
  linearly at the tensor's ``t`` (non-numeric lists pick ``values[int(t * (n - 1))]``); a list of
  ``{filter, value}`` takes the first entry whose ``filter`` is absent, ``*`` or a substring of the tensor name;
* precedence (``resolve_parameters``, mergekit ``parameter_resolver.py``): the model's own entry in the slice,
  then the output slice, then the top level, then the method's default; a required parameter without a value is
  an error naming the model and the tensor;
* the tensor plan (mergekit ``plan.py``): ``models:`` is one slice over every layer, with the base appended as an
  input when it is not listed; layer ``i`` of a slice of ``L`` layers gets ``t = i / (L - 1)`` (1 when
  ``L == 1``); the tensors outside the layers take ``t = 0`` and the inputs of the first slice (embeddings) or of
  the last slice (everything after the layers: final norm, LM head).

Tensors are matched by name, without an architecture table: a layer tensor is ``<prefix>.<i>.<rest>`` where
``<prefix>`` ends in ``layers``, ``h``, ``layer`` or ``blocks`` and ``i < num_hidden_layers``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

# ---------------------------------------------------------------------------------------------------------------
# The methods: their parameters and input rules, as mergekit 0.1.5 declares them


REQUIRED = object()  # a parameter without a default


@dataclass(frozen=True)
class MergekitParameter:
    """One parameter of a mergekit method: ``scope`` ``shared`` (one value per tensor), ``input`` (per input,
    base included) or ``non_base`` (per input other than the base)."""

    name: str
    kind: type
    scope: str
    default: Any = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def validate(self, value: Any, where: str) -> Any:
        """``value`` as this parameter's type (YAML ints are floats here; a bool is not a number)."""
        if value is None and not self.required and self.default is None:
            return None
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
        elif self.kind in (float, int):
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    pass
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                return self.kind(value) if self.kind is float or float(value).is_integer() else value
        elif isinstance(value, self.kind):
            return value
        raise ValueError(f"{where}: parameter {self.name!r} must be a {self.kind.__name__}, got {value!r}")


@dataclass(frozen=True)
class MergekitMethod:
    """A mergekit merge method: parameters, how the base takes part, input counts, names for the model card."""

    name: str
    pretty_name: str
    parameters: tuple[MergekitParameter, ...]
    base: str = "ignored"  # "required", "optional" or "ignored" (mergekit's BasePolicy)
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None
    reference_url: str | None = None

    @property
    def specs(self) -> dict[str, MergekitParameter]:
        return {p.name: p for p in self.parameters}


def _gta(name: str, pretty: str, url: str, *, normalize: bool, rescale: bool, extra: tuple = ()) -> MergekitMethod:
    return MergekitMethod(name, pretty, (
        MergekitParameter("int8_mask", bool, "shared", False),
        MergekitParameter("normalize", bool, "shared", normalize),
        MergekitParameter("rescale", bool, "shared", rescale),
        MergekitParameter("lambda", float, "shared", 1.0),
        MergekitParameter("weight", float, "non_base"),
        MergekitParameter("density", float, "non_base", 1.0),
        *extra,
    ), base="required", reference_url=url)


_GAMMA = (MergekitParameter("gamma", float, "non_base", 0.01),)
_EPSILON = (MergekitParameter("epsilon", float, "non_base", 0.15),)
_DARE_URL, _BREADCRUMBS_URL, _DELLA_URL = ("https://arxiv.org/abs/2311.03099", "https://arxiv.org/abs/2312.06795",
                                           "https://arxiv.org/abs/2406.11617")

#: the methods ``--config`` runs, with mergekit 0.1.5's parameters and defaults (``merge_methods/registry.py``,
#: ``generalized_task_arithmetic.py``, ``linear.py``, ``slerp.py``, ``nuslerp.py``, ``model_stock.py``,
#: ``passthrough.py``)
MERGEKIT_METHODS: dict[str, MergekitMethod] = {m.name: m for m in (
    MergekitMethod("linear", "Linear", (MergekitParameter("weight", float, "input"),
                                        MergekitParameter("normalize", bool, "shared", True)),
                   reference_url="https://arxiv.org/abs/2203.05482"),
    _gta("task_arithmetic", "Task Arithmetic", "https://arxiv.org/abs/2212.04089", normalize=False, rescale=False),
    _gta("ties", "TIES", "https://arxiv.org/abs/2306.01708", normalize=True, rescale=False),
    _gta("dare_ties", "DARE TIES", _DARE_URL, normalize=False, rescale=True),
    _gta("dare_linear", "Linear DARE", _DARE_URL, normalize=False, rescale=True),
    _gta("breadcrumbs", "Model Breadcrumbs", _BREADCRUMBS_URL, normalize=False, rescale=False, extra=_GAMMA),
    _gta("breadcrumbs_ties", "Model Breadcrumbs with TIES", _BREADCRUMBS_URL, normalize=False, rescale=False,
         extra=_GAMMA),
    _gta("della", "DELLA", _DELLA_URL, normalize=True, rescale=True, extra=_EPSILON),
    _gta("della_linear", "Linear DELLA", _DELLA_URL, normalize=False, rescale=True, extra=_EPSILON),
    MergekitMethod("slerp", "SLERP", (MergekitParameter("t", float, "shared"),), base="required", min_inputs=2,
                   max_inputs=2, reference_url="https://en.wikipedia.org/wiki/Slerp"),
    MergekitMethod("nuslerp", "NuSLERP", (MergekitParameter("weight", float, "non_base"),
                                          MergekitParameter("nuslerp_row_wise", bool, "shared", False),
                                          MergekitParameter("nuslerp_flatten", bool, "shared", True)),
                   base="optional", min_non_base=2, max_non_base=2),
    MergekitMethod("model_stock", "Model Stock", (MergekitParameter("filter_wise", bool, "shared", False),),
                   base="required", min_inputs=3, reference_url="https://arxiv.org/abs/2403.19522"),
    MergekitMethod("passthrough", "Passthrough", (MergekitParameter("scale", float, "input", None),),
                   max_inputs=1),
)}

#: DARE-family rescale: ``l1`` (mergekit: each tensor's L1 norm matched after dropping) or ``inverse_keep`` (the
#: paper: survivors divided by the keep rate, 1 - p = density); ``merge_checkpoints.py --dare_rescale``
RESCALE_MODES = ("l1", "inverse_keep")

_TOP_KEYS = ("merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template")
_MODEL_KEYS = ("model", "parameters")
_SLICE_KEYS = ("sources", "base_model", "residual_weight", "parameters")
_SOURCE_KEYS = ("model", "layer_range", "parameters")
DTYPES = ("float32", "float16", "bfloat16", "float64")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32"}


def nearest(name: str, choices: Sequence[str]) -> str:
    """`` (did you mean: x?)`` for the closest of ``choices``, or an empty string."""
    match = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" (did you mean: {match[0]}?)" if match else ""


def _unknown_keys(mapping: Mapping, allowed: Sequence[str], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {key!r}{nearest(key, allowed)}; allowed: {', '.join(allowed)}")


# ---------------------------------------------------------------------------------------------------------------
# The parsed configuration


@dataclass(frozen=True)
class SourceSlice:
    """One input of an output slice: ``model``'s layers ``[start, end)``, with its own parameters."""

    model: str
    layer_range: tuple[int, int] | None  # None: every layer (``models:`` form, known once the config is read)
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[SourceSlice, ...]
    base_model: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergekitConfig:
    """A validated mergekit configuration (``load_config``); ``text`` is the file, kept verbatim."""

    text: str
    method: MergekitMethod
    base_model: str | None
    slices: tuple[OutputSlice, ...]
    from_models: bool  # written with ``models:`` (one slice over every layer) rather than ``slices:``
    parameters: Mapping[str, Any]
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None

    def referenced_models(self) -> list[str]:
        """Every model, base first, then in order of first mention."""
        models = [self.base_model] if self.base_model else []
        for out in self.slices:
            if out.base_model:
                models.append(out.base_model)
            models += [s.model for s in out.sources]
        return list(dict.fromkeys(models))

    def merged_models(self) -> list[str]:
        """The models merged, base excluded (the model card's list)."""
        return [m for m in self.referenced_models() if m != self.base_model]


def _dtype(value: Any, key: str) -> str | None:
    if value is None:
        return None
    name = _DTYPE_ALIASES.get(str(value), str(value))
    if name not in DTYPES:
        raise ValueError(f"{key} must be one of {', '.join(DTYPES)}, got {value!r}{nearest(str(value), DTYPES)}")
    return name


def _model_name(value: Any, where: str) -> str:
    if isinstance(value, Mapping) and "model" in value:  # mergekit's {model: {path: ...}} long form
        value = value["model"].get("path") if isinstance(value["model"], Mapping) else value["model"]
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where} must be a model folder or hub id, got {value!r}")
    if "+" in value:
        raise ValueError(f"{where}: LoRA-applied references (model+lora) are not supported, got {value!r}; merge "
                         "the adapter into its model first")
    return value


def _check_parameters(parameters: Any, method: MergekitMethod, where: str) -> dict[str, Any]:
    """A ``parameters:`` block: a mapping of known parameter names; values checked in form (not yet resolved)."""
    if parameters is None:
        return {}
    if not isinstance(parameters, Mapping):
        raise ValueError(f"{where}.parameters must be a mapping of parameter names to values, got {parameters!r}")
    known = method.specs
    for name, setting in parameters.items():
        if name not in known:
            raise ValueError(f"{where}.parameters: unknown parameter {name!r} for merge_method {method.name}"
                             f"{nearest(name, list(known))}; {method.name} takes: {', '.join(method.specs)}")
        _check_setting(setting, known[name], f"{where}.parameters.{name}")
    return dict(parameters)


def _check_setting(setting: Any, spec: MergekitParameter, where: str) -> None:
    if isinstance(setting, Mapping):
        raise ValueError(f"{where}: a filtered value must be a list of {{filter, value}} entries, got a mapping "
                         f"{dict(setting)!r}; write - filter: ... value: ...")
    if isinstance(setting, list):
        if not setting:
            raise ValueError(f"{where}: an empty list has no value")
        if all(isinstance(e, Mapping) for e in setting):
            for entry in setting:
                _unknown_keys(entry, ("filter", "value"), where)
                if "value" not in entry:
                    raise ValueError(f"{where}: entry {dict(entry)!r} has no value")
                _check_setting(entry["value"], spec, where)
            return
        for entry in setting:
            if isinstance(entry, (Mapping, list)):
                raise ValueError(f"{where}: a gradient is a list of numbers, got {setting!r}")
            spec.validate(entry, where)
        return
    spec.validate(setting, where)


def _layer_range(value: Any, where: str) -> tuple[int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{where}.layer_range must be [start, end] (integers, end exclusive), got {value!r}")
    start, end = value
    if not 0 <= start < end:
        raise ValueError(f"{where}.layer_range must satisfy 0 <= start < end, got {list(value)}")
    return start, end


def load_config(text: str, *, where: str = "config") -> MergekitConfig:
    """Parse and validate a mergekit YAML configuration (everything that does not need the models' headers).

    Raises:
        ValueError: naming the key, the constraint and the value (and the nearest valid name for unknown names).
    """
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as error:
        raise ValueError(f"{where} is not valid YAML: {error}") from error
    if len(documents) > 1:
        raise ValueError(f"{where} holds {len(documents)} YAML documents (a mergekit-mega file); run each document as "
                         "its own --config, the later ones naming the earlier outputs as models")
    raw = documents[0] if documents else None
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be a YAML mapping with merge_method and models or slices, got {raw!r}")
    _unknown_keys(raw, _TOP_KEYS, where)
    for key in ("modules", "tokenizer", "chat_template"):
        if raw.get(key) is not None:
            raise ValueError(f"{where}: {key!r} is not supported by this merger yet; "
                             + {"modules": "use models or slices (single-module models)",
                                "tokenizer": "use tokenizer_source: base or a model name",
                                "chat_template": "set the chat template on the merged tokenizer afterwards"}[key])
    name = raw.get("merge_method")
    if name not in MERGEKIT_METHODS:
        raise ValueError(f"{where}.merge_method must be one of {', '.join(MERGEKIT_METHODS)}, got {name!r}"
                         f"{nearest(str(name), list(MERGEKIT_METHODS))}")
    method = MERGEKIT_METHODS[name]
    if (raw.get("models") is None) == (raw.get("slices") is None):
        raise ValueError(f"{where}: exactly one of 'models' or 'slices' must be given")
    base = _model_name(raw["base_model"], f"{where}.base_model") if raw.get("base_model") is not None else None
    slices: list[OutputSlice] = []
    if raw.get("models") is not None:
        if not isinstance(raw["models"], list) or not raw["models"]:
            raise ValueError(f"{where}.models must be a non-empty list of {{model, parameters}}, "
                             f"got {raw['models']!r}")
        sources = []
        for i, entry in enumerate(raw["models"]):
            at = f"{where}.models[{i}]"
            entry = {"model": entry} if isinstance(entry, str) else entry
            if not isinstance(entry, Mapping):
                raise ValueError(f"{at} must be a mapping with 'model', got {entry!r}")
            _unknown_keys(entry, _MODEL_KEYS, at)
            sources.append(SourceSlice(_model_name(entry.get("model"), f"{at}.model"), None,
                                       _check_parameters(entry.get("parameters"), method, at)))
        if base is not None and base not in [s.model for s in sources]:
            sources.append(SourceSlice(base, None, {}))  # mergekit appends the base as an input, without parameters
        slices.append(OutputSlice(tuple(sources)))
    else:
        if not isinstance(raw["slices"], list) or not raw["slices"]:
            raise ValueError(f"{where}.slices must be a non-empty list of {{sources: [...]}}, got {raw['slices']!r}")
        for i, out in enumerate(raw["slices"]):
            at = f"{where}.slices[{i}]"
            if not isinstance(out, Mapping):
                raise ValueError(f"{at} must be a mapping with 'sources', got {out!r}")
            _unknown_keys(out, _SLICE_KEYS, at)
            if out.get("residual_weight") is not None:
                raise ValueError(f"{at}.residual_weight is not supported (mergekit 0.1.5 does not use it either)")
            if not isinstance(out.get("sources"), list) or not out["sources"]:
                raise ValueError(f"{at}.sources must be a non-empty list of {{model, layer_range}}")
            sources = []
            for j, source in enumerate(out["sources"]):
                sat = f"{at}.sources[{j}]"
                if not isinstance(source, Mapping):
                    raise ValueError(f"{sat} must be a mapping with 'model' and 'layer_range', got {source!r}")
                _unknown_keys(source, _SOURCE_KEYS, sat)
                if "layer_range" not in source:
                    raise ValueError(f"{sat}.layer_range is required ([start, end], end exclusive)")
                sources.append(SourceSlice(_model_name(source.get("model"), f"{sat}.model"),
                                           _layer_range(source["layer_range"], sat),
                                           _check_parameters(source.get("parameters"), method, sat)))
            lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
            if len(lengths) > 1:
                raise ValueError(f"{at}: every source of a slice must have the same number of layers, got "
                                 + ", ".join(f"{s.model} {list(s.layer_range)}" for s in sources))
            models = [s.model for s in sources]
            if len(set(models)) != len(models):
                raise ValueError(f"{at}: a model appears twice among the sources ({models})")
            slice_base = (_model_name(out["base_model"], f"{at}.base_model")
                          if out.get("base_model") is not None else None)
            slices.append(OutputSlice(tuple(sources), slice_base, _check_parameters(out.get("parameters"), method,
                                                                                   at)))
    parameters = _check_parameters(raw.get("parameters"), method, where)
    config = MergekitConfig(
        text=text, method=method, base_model=base, slices=tuple(slices), from_models=raw.get("models") is not None,
        parameters=parameters, dtype=_dtype(raw.get("dtype"), f"{where}.dtype"),
        out_dtype=_dtype(raw.get("out_dtype"), f"{where}.out_dtype"),
        tokenizer_source=_tokenizer_source(raw.get("tokenizer_source"), f"{where}.tokenizer_source"))
    for i, out in enumerate(config.slices):
        _check_inputs(config, out, f"{where}.slices[{i}]" if not config.from_models else f"{where}.models")
    _check_static_values(config, where)
    return config


def _tokenizer_source(value: Any, where: str) -> str | None:
    if value is None or value == "base":
        return value
    if value == "union":
        raise ValueError(f"{where}: 'union' (a merged vocabulary with permuted embeddings) is not supported; use "
                         "'base' or a model name, whose tokenizer is copied (every model must then have the same "
                         "embedding shapes)")
    return _model_name(value, where)


def _check_inputs(config: MergekitConfig, out: OutputSlice, where: str) -> None:
    """mergekit's ``InputContract`` of the method, before any tensor is read."""
    method = config.method
    base = out.base_model or config.base_model
    models = [s.model for s in out.sources]
    has_base = base is not None and base in models
    if method.base == "ignored":
        has_base = False
    elif base is not None and not has_base:
        raise ValueError(f"{where}: the base model {base} is not among the inputs {models}")
    if method.base == "required" and not has_base:
        raise ValueError(f"{where}: merge_method {method.name} needs a base_model (the origin of its deltas), "
                         "got none")
    count, non_base = len(models), len(models) - int(has_base)
    for what, n, low, high in (("inputs", count, method.min_inputs, method.max_inputs),
                               ("non-base inputs", non_base, method.min_non_base, method.max_non_base)):
        if low is None and high is None:
            continue
        if n < (low or 0) or (high is not None and n > high):
            expected = (f"exactly {low}" if low == high else f"at least {low}" if high is None
                        else f"between {low or 0} and {high}")
            noun = what[:-1] if (high if high is not None else low) == 1 else what
            raise ValueError(f"{where}: merge_method {method.name} takes {expected} {noun}, got {n} ({models})")


def _check_static_values(config: MergekitConfig, where: str) -> None:
    """Constraints that every tensor's value must meet and that scalars and gradients show up front: della's
    ``density - epsilon > 0`` and ``density + epsilon < 1`` (filtered values are checked per tensor)."""
    if not config.method.name.startswith("della"):
        return
    for out in config.slices:
        for source in out.sources:
            if source.model == (out.base_model or config.base_model):
                continue
            scopes = (source.parameters, out.parameters, config.parameters)
            density = _plain(scopes, "density", config.method)
            epsilon = _plain(scopes, "epsilon", config.method)
            if density is None or epsilon is None:
                continue
            for d in density:
                for e in epsilon:
                    check_della_bounds(d, e, f"{where}: {source.model}")


def _plain(scopes: Sequence[Mapping[str, Any]], name: str, method: MergekitMethod) -> list[float] | None:
    """The values a parameter can take when it is a scalar or a gradient (its end points bound it); None when
    filtered."""
    for scope in scopes:
        if name in scope:
            setting = scope[name]
            if isinstance(setting, list):
                return None if any(isinstance(e, Mapping) for e in setting) else [float(v) for v in setting]
            return [float(setting)]
    return [method.specs[name].default]


def check_della_bounds(density: float, epsilon: float, where: str) -> None:
    """della keeps each entry with probability in ``[density - epsilon, density + epsilon]``: both in (0, 1)."""
    if not (density - epsilon > 0 and density + epsilon < 1):
        raise ValueError(f"{where}: della needs 0 < density - epsilon and density + epsilon < 1, got density "
                         f"{density} and epsilon {epsilon} ({density - epsilon:g}..{density + epsilon:g}); lower "
                         "epsilon or move density away from 0 and 1")


# ---------------------------------------------------------------------------------------------------------------
# Values per tensor


def evaluate_setting(tensor_name: str, setting: Any, t: float, spec: MergekitParameter) -> Any:
    """mergekit's ``evaluate_setting``: a scalar, a gradient at ``t``, or the first matching ``{filter, value}``;
    None when no filter matches (the next scope is asked)."""
    where = f"{spec.name} at {tensor_name}"
    if isinstance(setting, Mapping):
        setting = [setting]
    if not isinstance(setting, list):
        return spec.validate(setting, where)
    if not setting:
        return None
    if all(not isinstance(e, Mapping) for e in setting):
        values = [spec.validate(e, where) for e in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return spec.validate((1 - frac) * values[i0] + frac * values[i1], where)
    for entry in setting:
        condition = entry.get("filter")
        if condition is None or condition == "*" or (tensor_name and condition in tensor_name):
            return evaluate_setting(tensor_name, entry["value"], t, spec)
    return None


def resolve_parameter(spec: MergekitParameter, scopes: Sequence[Mapping[str, Any]], *, tensor_name: str, t: float,
                      model: str | None = None) -> Any:
    """The first scope (highest precedence first) with a value for this tensor, else the default."""
    for scope in scopes:
        if scope and spec.name in scope:
            value = evaluate_setting(tensor_name, scope[spec.name], t, spec)
            if value is not None:
                return value
    if spec.required:
        location = f"{model}: {tensor_name}" if model is not None else tensor_name
        raise ValueError(f"missing required parameter {spec.name!r} for {location}; give it under parameters "
                         f"(per model, per slice or at the top level)")
    return spec.default


@dataclass(frozen=True)
class TensorSource:
    """One input of an output tensor: ``model``'s tensor ``name``."""

    model: str
    name: str


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its inputs (in the slice's source order), base, ``t`` and the slice it belongs to."""

    name: str
    sources: tuple[TensorSource, ...]
    base_model: str | None
    t: float
    slice_index: int


def resolve_tensor_parameters(config: MergekitConfig, plan: TensorPlan
                              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(shared, per_input)`` parameter values of one output tensor (per_input in ``plan.sources`` order); the
    base gets only ``input``-scope parameters."""
    out = config.slices[plan.slice_index]
    method = config.method
    known = method.specs
    shared_scopes = (out.parameters, config.parameters)
    shared = {spec.name: resolve_parameter(spec, shared_scopes, tensor_name=plan.name, t=plan.t)
              for spec in known.values() if spec.scope == "shared"}
    per_input = []
    for source in plan.sources:
        own = next((s.parameters for s in out.sources if s.model == source.model), {})
        scopes = (own, out.parameters, config.parameters)
        is_base = source.model == plan.base_model and method.base != "ignored"
        per_input.append({spec.name: resolve_parameter(spec, scopes, tensor_name=source.name, t=plan.t,
                                                       model=source.model)
                          for spec in method.parameters
                          if spec.scope == "input" or (spec.scope == "non_base" and not is_base)})
    return shared, per_input


# ---------------------------------------------------------------------------------------------------------------
# The tensor plan


_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|layer|blocks))\.(?P<index>\d+)\.(?P<rest>.+)$")
_PRE = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings")


def num_layers(model_config: Mapping[str, Any], where: str) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(model_config.get(key), int):
            return model_config[key]
    raise ValueError(f"{where}: config.json has no num_hidden_layers (or n_layer / num_layers); cannot map layers")


def split_layer_name(name: str, layers: int) -> tuple[str, int, str] | None:
    """``(prefix, index, rest)`` of a layer tensor name, or None for a tensor outside the layers."""
    match = _LAYER.match(name)
    if match is None or int(match["index"]) >= layers:
        return None
    return match["prefix"], int(match["index"]), match["rest"]


def with_layer_ranges(config: MergekitConfig, layer_counts: Mapping[str, int]) -> MergekitConfig:
    """``config`` with every ``models:`` source covering all its model's layers; checks slice ranges and, for
    ``models:``, that every model has the same number of layers."""
    slices = []
    for i, out in enumerate(config.slices):
        sources = []
        for source in out.sources:
            count = layer_counts[source.model]
            if source.layer_range is None:
                sources.append(SourceSlice(source.model, (0, count), source.parameters))
                continue
            if source.layer_range[1] > count:
                raise ValueError(f"slices[{i}]: layer_range {list(source.layer_range)} of {source.model} is out of "
                                 f"bounds: the model has {count} layers (end is exclusive, at most {count})")
            sources.append(source)
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
        if len(lengths) > 1:
            raise ValueError("models: every model must have the same number of layers to be merged, got "
                             + ", ".join(f"{s.model} {s.layer_range[1]}" for s in sources))
        slices.append(OutputSlice(tuple(sources), out.base_model, out.parameters))
    return dataclasses.replace(config, slices=tuple(slices))


def plan_tensors(config: MergekitConfig, names: Mapping[str, Sequence[str]], layer_counts: Mapping[str, int]
                 ) -> tuple[list[TensorPlan], int]:
    """Every output tensor in mergekit's order (pre-layer tensors, each slice's layers, post-layer tensors) and the
    output's layer count. ``names`` holds each model's tensor names (headers), ``layer_counts`` each model's layers.

    Raises:
        ValueError: a tensor missing from an input it is read from, naming the tensor and the model.
    """
    config = with_layer_ranges(config, layer_counts)
    first, last = config.slices[0], config.slices[-1]
    available = {m: set(n) for m, n in names.items()}
    reference = first.sources[0].model
    outside = [n for n in names[reference] if split_layer_name(n, layer_counts[reference]) is None]
    # the tensors of one layer, as the first input's layer 0 has them (every layer has the same; a missing one is
    # an error below)
    prefix, layer_tensors = None, []
    for name in names[reference]:
        parts = split_layer_name(name, layer_counts[reference])
        if parts is not None and parts[1] == 0:
            prefix = parts[0]
            layer_tensors.append(parts[2])
    plans: list[TensorPlan] = []

    def add(name: str, sources: Sequence[TensorSource], out: OutputSlice, index: int, t: float) -> None:
        for source in sources:
            if source.name not in available[source.model]:
                raise ValueError(f"{source.model} has no tensor {source.name!r} (needed for {name!r})")
        plans.append(TensorPlan(name, tuple(sources), out.base_model or config.base_model, t, index))

    for name in sorted(n for n in outside if _PRE.search(n)):
        add(name, [TensorSource(s.model, name) for s in first.sources], first, 0, 0.0)
    out_layer = 0
    for index, out in enumerate(config.slices):
        length = out.sources[0].layer_range[1] - out.sources[0].layer_range[0]
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            for rest in sorted(layer_tensors):
                sources = [TensorSource(s.model, f"{prefix}.{s.layer_range[0] + offset}.{rest}") for s in out.sources]
                add(f"{prefix}.{out_layer}.{rest}", sources, out, index, t)
            out_layer += 1
    for name in sorted(n for n in outside if not _PRE.search(n)):
        add(name, [TensorSource(s.model, name) for s in last.sources], last, len(config.slices) - 1, 0.0)
    return plans, out_layer
