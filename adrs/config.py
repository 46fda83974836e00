"""The run configuration: typed, strict (unknown keys are errors), loaded and written in one place."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adrs.llm.config import LLMConfig
from adrs.parents import SelectionConfig
from evaluator.workload.spec import WorkloadSpec, resolve_spec


class EvaluationConfig(BaseModel):
    """How candidates are scored."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: float = Field(120.0, gt=0, description="wall-time limit of one evaluation")
    memory_mb: int = Field(8192, gt=0, description="address-space limit of the candidate process")
    in_process: bool = Field(False, description="score in the harness process (trusted candidates only; no sandbox)")
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
    ray_address: str | None = Field(None, description="executor ray: the cluster to join, e.g. 'ray://head:10001' or 'head:6379'")
    max_attempts: int = Field(
        3, ge=1, description="tries per candidate when its evaluation worker or node is lost (a failing candidate is not retried)",
    )


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
    seed_candidate: str = Field("seeds/sink_window.py", description="starting masker (path, relative to the config file or cwd)")
    workload: Union[str, WorkloadSpec] = Field("default", description="preset name or an inline spec")
    heldout_workload: Union[str, WorkloadSpec, None] = Field("heldout", description="for the cascade and rescore; null = off")
    llm: Union[LLMConfig, Literal["offline", "structural"]] = Field(
        "offline", description="an LLM config; 'offline' (tunes constants) or 'structural' (recombines primitives) need no LLM",
    )
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    review: ReviewConfig = Field(default_factory=ReviewConfig)

    def workload_spec(self) -> WorkloadSpec:
        return resolve_spec(self.workload)

    def heldout_spec(self) -> WorkloadSpec | None:
        return None if self.heldout_workload is None else resolve_spec(self.heldout_workload)


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the offending key path."""


def _describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    path = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{path}: {first['msg']}{more}"


def parse_config(data: object) -> RunConfig:
    """Validate plain data (from YAML) into a RunConfig."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("config must be a mapping of keys to values")
    try:
        cfg = RunConfig.model_validate(data)
        cfg.workload_spec()
        cfg.heldout_spec()
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
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
