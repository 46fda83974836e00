"""The run configuration: typed, strict (unknown keys are errors), loaded and written in one place."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adrs.agent.config import AgentConfig
from adrs.llm.config import LLMConfig
from adrs.parents import SelectionConfig
from evaluator.workload.spec import PRESETS, WorkloadSpec, resolve_spec


class EvaluationConfig(BaseModel):
    """How candidates are scored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: float = Field(120.0, gt=0, description="wall-time limit of one evaluation")
    memory_mb: int = Field(8192, gt=0, description="address-space limit of the candidate process")
    in_process: bool = Field(False, description="score in the harness process (trusted candidates only; no sandbox)")
    unsafe_allow_unisolated: bool = Field(
        False, description="where the kernel allows no sandbox namespaces, run LLM-written candidates anyway with weaker "
        "containment (every report says NOT ISOLATED); also ADRS_UNSAFE_ALLOW_UNISOLATED=1",
    )
    scratch_mb: int = Field(64, gt=0, description="what a candidate may write (its private tmpfs: cwd, /tmp, /dev/shm)")
    heldout_margin: float = Field(
        0.0, ge=0, description="cascade: a candidate beating the best by more than this is re-scored on the held-out workload",
    )
    numerics_audit: bool = Field(
        True, description="a candidate beating the best is re-scored in float64; a gain that disappears there is flagged",
    )
    audit_tolerance: float = Field(
        1e-9, ge=0, description="numerics audit: the float64 gain over the best must exceed this to count",
    )
    executor: Literal["local", "ray"] = Field(
        "local", description="local: a sandboxed worker per visible GPU (or CPU workers); ray: actors on an existing Ray cluster",
    )
    workers: int | None = Field(
        None, gt=0, description="evaluations at once; null = one per visible GPU, or 1 on CPU (ray: one actor per cluster GPU, or 1)",
    )
    spares: int | None = Field(
        None, gt=0, description="warm sandbox workers kept per evaluation slot, so a worker's start-up (torch, CUDA "
        "context: seconds) overlaps earlier candidates; null = 1 on CPU or a small machine, on a GPU up to 8 bounded by "
        "cores and GPU memory; each warm spare on a GPU holds a CUDA context and the workload's inputs (~2 GB for default)",
    )
    slot_processes: bool | None = Field(
        None, description="executor local: each GPU's evaluations are scored by a harness process of its own, which "
        "loads the workloads from the disk cache, instead of by a thread of the run's process (null = when there is "
        "more than one GPU: threads would share one interpreter lock)",
    )
    in_flight: int | None = Field(
        None, gt=0, description="LLM-free mutators: proposals being scored at once (null = one per evaluation worker); "
        "a run replays exactly for the same value, which is recorded in the run's config",
    )
    ray_address: str | None = Field(None, description="executor ray: the cluster to join, e.g. 'ray://head:10001' or 'head:6379'")
    max_attempts: int = Field(
        3, ge=1, description="tries per candidate when its evaluation worker or node is lost (a failing candidate is not retried)",
    )
    speedup: bool = Field(
        False, description="also time each valid candidate's selections with the sparse-decode kernel against dense "
        "attention on the scoring GPU (its decode speedup goes into the archive); needs CUDA and Triton",
    )
    speedup_records: int = Field(8, ge=1, description="speedup: records timed per candidate, spread over the layers")
    speedup_queries: int = Field(2, ge=1, description="speedup: decode queries timed per record")


class ReviewConfig(BaseModel):
    """Human-review checkpoints."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    every: int = Field(0, ge=0, description="a checkpoint every N iterations (0 = off)")
    on_new_best: bool = Field(False, description="a checkpoint whenever a new best appears")
    mode: Literal["continue", "pause"] = Field("continue", description="pause: the run waits for `adrs review`")


class RunConfig(BaseModel):
    """Everything that defines a run. `adrs init` writes a commented example."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "run"
    seed: int = Field(0, description="seeds parent selection and the LLM-free mutators")
    iterations: int = Field(40, ge=0, description="candidates to add after the seed")
    density_target: float = Field(0.10, gt=0, le=1)
    objective: Literal["density", "speedup"] = Field(
        "density", description="density: combined = -(error + 100 * max(0, density - density_target)); speedup: "
        "combined = -(error + 100 * max(0, 1/speedup - 1/speedup_target)) with the measured decode speedup",
    )
    speedup_target: float | None = Field(None, gt=1, description="objective speedup: the decode speedup aimed at, e.g. 4")
    seed_candidate: str = Field("seeds/sink_window.py", description="starting masker (path, relative to the config file or cwd)")
    workload: Union[str, WorkloadSpec] = Field("default", description="preset name or an inline spec")
    heldout_workload: Union[str, WorkloadSpec, None] = Field("heldout", description="for the cascade and rescore; null = off")
    llm: Union[LLMConfig, Literal["offline", "structural"]] = Field(
        "offline", description="an LLM config; 'offline' (tunes constants) or 'structural' (recombines primitives) need no LLM",
    )
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    review: ReviewConfig = Field(default_factory=ReviewConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig, description="agent mode (`adrs agent`): budgets and context")

    def workload_spec(self) -> WorkloadSpec:
        return resolve_spec(self.workload)

    def heldout_spec(self) -> WorkloadSpec | None:
        return None if self.heldout_workload is None else resolve_spec(self.heldout_workload)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the offending key path."""


def _model_at(loc: tuple, model: type[BaseModel] = None) -> type[BaseModel] | None:
    """The config model that the key path ``loc`` (pydantic's error location) points into."""
    current: object = model or RunConfig
    for i, part in enumerate(loc):
        if isinstance(current, type) and issubclass(current, BaseModel):
            if part not in current.model_fields:
                return None
            current = current.model_fields[part].annotation
            continue
        members = [a for a in get_args(current) if isinstance(a, type) and issubclass(a, BaseModel)]
        if isinstance(part, str) and members:  # a union member's tag, e.g. "function-after[..., LLMConfig]"
            named = [m for m in members if m.__name__ in part]
            if not named:
                return None
            current = named[0]
        elif isinstance(part, int) and members:  # a list item
            current = members[0]
        else:
            return None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    members = [a for a in get_args(current) if isinstance(a, type) and issubclass(a, BaseModel)]
    return members[0] if len(members) == 1 else None


def _readable(loc: tuple) -> str:
    """The key path as the user wrote it: union members' tags left out."""
    keys = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p[:1].isupper()))]
    return ".".join(keys) or "(top level)"


def _problem(err: dict) -> str:
    loc = tuple(err["loc"])
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        key = str(loc[-1])
        near = difflib.get_close_matches(key, list(parent.model_fields), n=1, cutoff=0.6) if parent else []
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        return f"{_readable(loc)}: unknown key{hint}"
    return f"{_readable(loc)}: {err['msg']}"


def _describe(exc: ValidationError) -> str:
    """Every problem, on one line; a union's "or it could have been the other kind" noise left out."""
    errors = exc.errors()
    # `llm` is a mapping or 'offline', so pydantic reports each mistake against both: keep the
    # mapping's errors when the user wrote a mapping (a key inside it), the literal's otherwise.
    deep = {tuple(e["loc"][:i]) for e in errors for i, p in enumerate(e["loc"])
            if isinstance(p, str) and p.startswith("function-after") and len(e["loc"]) > i + 1}
    literal = {tuple(e["loc"][:-1]) for e in errors if e["type"] == "literal_error"}

    def noise(e: dict) -> bool:
        loc = tuple(e["loc"])
        if e["type"] == "literal_error":
            return loc[:-1] in deep
        return isinstance(loc[-1], str) and loc[-1].startswith("function-after") and loc[:-1] in literal - deep

    kept = [e for e in errors if not noise(e)]
    problems = list(dict.fromkeys(_problem(e) for e in kept or errors))
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems: " + "; ".join(problems)


def _check_workload(cfg: RunConfig) -> None:
    for key in ("workload", "heldout_workload"):
        value = getattr(cfg, key)
        if isinstance(value, str) and value not in PRESETS:
            near = difflib.get_close_matches(value, list(PRESETS), n=1, cutoff=0.6)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ConfigError(f"{key}: unknown workload preset {value!r}{hint}; presets: {', '.join(PRESETS)}")


def check_objective(cfg: RunConfig) -> None:
    """A speedup objective needs its target and the measurement; a target needs the objective."""
    if cfg.objective == "speedup":
        if cfg.speedup_target is None:
            raise ConfigError("objective: 'speedup' needs speedup_target (e.g. 4)")
        if not cfg.evaluation.speedup:
            raise ConfigError("objective: 'speedup' needs evaluation.speedup: true (the speedup is measured on a GPU)")
    elif cfg.speedup_target is not None:
        raise ConfigError("speedup_target: used only with objective: speedup")


def parse_config(data: object) -> RunConfig:
    """Validate plain data (from YAML) into a RunConfig."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config must be a mapping of keys to values")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    _check_workload(cfg)
    check_objective(cfg)
    return cfg


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such config file: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return parse_config(data)


def dump_config(cfg: RunConfig) -> str:
    """The one serialisation of a config (the run directory's resolved config.yaml)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
