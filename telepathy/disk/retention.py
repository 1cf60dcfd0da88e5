"""Retention policy: which committed checkpoints to keep. Pure decisions; the store does the deleting."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class RetentionPolicy:
    """Keep the newest ``keep_last``, the one with the best metric (lowest unless ``higher_is_better``),
    and every step that is a multiple of ``keep_every``. ``keep_last=None`` keeps everything."""

    keep_last: int | None = 3
    keep_best: bool = True
    keep_every: int | None = None
    higher_is_better: bool = False

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (the newest checkpoint is always kept), got {self.keep_last}")
        if self.keep_every is not None and self.keep_every < 1:
            raise ValueError(f"keep_every must be >= 1 step, got {self.keep_every}")

    def steps_to_keep(self, metrics_by_step: Mapping[int, float | None]) -> set[int]:
        """Given every committed checkpoint (step -> tracked metric or None), the steps to keep."""
        steps = sorted(metrics_by_step)
        if self.keep_last is None:
            return set(steps)
        keep = set(steps[-self.keep_last :])
        if self.keep_every:
            keep |= {s for s in steps if s % self.keep_every == 0}
        if self.keep_best:
            scored = [(m, s) for s, m in metrics_by_step.items() if m is not None and not math.isnan(m)]
            if scored:
                best = max(scored) if self.higher_is_better else min(scored, key=lambda ms: (ms[0], -ms[1]))
                keep.add(best[1])
        return keep
