"""Faithful scores for a run: the model, prefill and dense reference of each preset, and a warm
sandbox pool, kept between calls (an agent asks for many)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from evaluator.candidate import candidate_file

if TYPE_CHECKING:
    from evaluator.faithful import FaithfulContext
    from evaluator.faithful.metrics import FaithfulReport
    from evaluator.sandbox import SandboxLimits, WorkerPool


@dataclass
class FaithfulScorer:
    """Scores code on faithful presets, one at a time (a context's decoder is not shareable).

    The first call on a preset builds its ``FaithfulContext`` (seconds: model, prefill, the dense
    reference decode); later calls reuse it and take their worker from a warm pool on its device.
    """

    limits: SandboxLimits
    density_target: float
    in_process: bool = False
    _contexts: dict[str, FaithfulContext] = field(default_factory=dict)
    _pool: WorkerPool | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def score(self, code: str, preset: str) -> FaithfulReport:
        """Faithful score of ``code`` on ``preset``, sandboxed unless ``in_process``."""
        from evaluator.faithful import FaithfulContext, faithful_score
        from evaluator.sandbox import WorkerPool

        with self._lock:
            ctx = self._contexts.get(preset)
            if ctx is None:
                ctx = self._contexts[preset] = FaithfulContext(preset)
            if not self.in_process and (self._pool is None or self._pool.device != str(ctx.device)):
                self._close_pool()
                self._pool = WorkerPool(self.limits, cuda=ctx.device.type == "cuda", device=str(ctx.device))
            with candidate_file(code) as path:
                return faithful_score(path, preset, self.density_target, self.limits, self.in_process,
                                      context=ctx, pool=self._pool)

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def close(self) -> None:
        """Free the contexts (their prefix files) and the pool's workers."""
        with self._lock:
            self._close_pool()
            for ctx in self._contexts.values():
                ctx.close()
            self._contexts.clear()
