"""Faithful scoring: the model decodes with the candidate's sparse attention in every layer.

``faithful_score(path, spec, density_target, limits=None, in_process=False)`` returns a
``FaithfulReport``; ``FaithfulContext`` keeps the model, prompts and dense reference of a
spec for many candidates. Definitions of every number: ``evaluator.faithful.metrics``.
"""
from evaluator.faithful.metrics import FaithfulReport
from evaluator.faithful.score import FaithfulContext, faithful_score
from evaluator.faithful.spec import FAITHFUL_PRESETS, FaithfulSpec, resolve_faithful_spec

__all__ = ["FAITHFUL_PRESETS", "FaithfulContext", "FaithfulReport", "FaithfulSpec", "faithful_score", "resolve_faithful_spec"]
