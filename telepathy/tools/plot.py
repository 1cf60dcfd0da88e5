"""``python -m telepathy plot SAVE_DIR``: one PNG of a run's life from ``events.jsonl``.

Top: the loss (the metric passed to ``step_boundary``, averaged per progress record) against the step, a dot
on the curve at each committed checkpoint, a red dashed line where the run was preempted and a green dotted one
where it resumed (the stretch between them is replayed work). Bottom: throughput (steps/s) against wall-clock
time, the downtime between a preemption and the resume shaded. matplotlib is imported only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from telepathy.tools.run_events import run_events


def plot_run(save_dir: Path, out: Path) -> tuple[Path, int]:
    """Write the plot to ``out`` (a PNG unless its suffix names another format matplotlib writes); return the
    file and how many records of the event log were left out (:mod:`telepathy.tools.run_events`)."""
    import matplotlib  # noqa: PLC0415 (optional dependency, only for this command)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    events, skipped = run_events(save_dir)
    progress = [e for e in events if e["event"] == "progress" and e.get("metric") is not None]
    if not progress:
        raise ValueError(f"{save_dir}/events.jsonl has no progress records to plot (a run writes one every few "
                         "seconds once it has trained)")  # fmt: skip
    t0 = events[0]["time"]
    fig, (loss_ax, rate_ax) = plt.subplots(2, 1, figsize=(10, 7), gridspec_kw={"height_ratios": [3, 2]})
    segments = _segments(progress)
    for i, seg in enumerate(segments):  # one line per process lifetime, so a replay draws over the old curve
        loss_ax.plot([e["step"] for e in seg], [e["metric"] for e in seg], color="tab:blue", lw=1.2,
                     alpha=1.0 if i == len(segments) - 1 else 0.85, label="loss" if i == 0 else None)  # fmt: skip
    saves = [e for e in events if e["event"] == "save"]
    steps, losses = [e["step"] for e in progress], [e["metric"] for e in progress]
    loss_ax.scatter([s["step"] for s in saves], [_interp(s["step"], steps, losses) for s in saves], s=22,
                    color="black", zorder=3, label=f"checkpoint ({len(saves)})")  # fmt: skip
    span = events[-1]["time"] - t0
    unit, scale = ("min", 60.0) if span > 180 else ("s", 1.0)
    top = max(losses)
    for n, (stop, resume) in enumerate(_interruptions(events)):
        why = stop.get("signal") or "killed"
        loss_ax.axvline(stop["step"], color="tab:red", ls="--", lw=1.2, label="preempted" if n == 0 else None)
        loss_ax.annotate(f"{why} @ {stop['step']} ", (stop["step"], top), color="tab:red", fontsize=8, va="top",
                         ha="right", rotation=90)  # fmt: skip
        rate_ax.axvline((stop["time"] - t0) / scale, color="tab:red", ls="--", lw=1.2)
        if resume is not None:
            loss_ax.axvline(resume["step"], color="tab:green", ls=":", lw=1.6,
                            label="resumed from checkpoint" if n == 0 else None)  # fmt: skip
            rate_ax.axvspan((stop["time"] - t0) / scale, (resume["time"] - t0) / scale, color="tab:red", alpha=0.12,
                            label="down (preempted until resumed)" if n == 0 else None)  # fmt: skip
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title(f"{save_dir.name}: loss, checkpoints and preemptions")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(loc="upper right", fontsize=8)
    for i, seg in enumerate(segments):
        rate_ax.plot([(e["time"] - t0) / scale for e in seg], [e["steps_per_s"] for e in seg], color="tab:purple",
                     marker=".", lw=1, label="throughput" if i == 0 else None)  # fmt: skip
    rate_ax.set_xlabel(f"wall-clock time since the first start ({unit})")
    rate_ax.set_ylabel("steps/s")
    rate_ax.set_ylim(bottom=0)
    rate_ax.grid(alpha=0.3)
    rate_ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    named = out.suffix.lstrip(".").lower()  # a format always: with none, matplotlib would write OUT.png, not OUT
    try:
        fig.savefig(out, dpi=110, format=named if named in fig.canvas.get_supported_filetypes() else "png")
    finally:
        plt.close(fig)
    return out, skipped


def _segments(progress: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Split progress records by process (pid): each lifetime of the trainer is its own line."""
    segments: list[list[dict[str, Any]]] = []
    for e in progress:
        if not segments or segments[-1][-1]["pid"] != e["pid"]:
            segments.append([])
        segments[-1].append(e)
    return segments


def _interruptions(events: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """(the stop, the resume that followed or None) for each preemption, crash or kill."""
    pairs, stop = [], None
    for e in events:
        if e["event"] == "preempt" and stop is None:
            stop = e
        elif e["event"] == "resume":
            if stop is None:  # killed without a preempt record: the last trainer event before it
                before = [x for x in events if x["time"] < e["time"] and x.get("source") == "trainer" and "step" in x]
                stop = before[-1] if before else None
            if stop is not None:
                pairs.append((stop, e))
            stop = None
    if stop is not None:
        pairs.append((stop, None))
    return pairs


def _interp(step: int, steps: list[int], values: list[float]) -> float:
    """The plotted loss at ``step`` (nearest earlier progress record), so checkpoint dots sit on the curve."""
    best = values[0]
    for s, v in zip(steps, values):
        if s <= step:
            best = v
    return best
