"""Number formatting shared by the report, the CLI, the templates and the figure."""

from __future__ import annotations


def si(value: float, digits: int = 3) -> str:
    """1.545e9 → '1.545B' (parameters, tokens); small values keep `digits` significant digits."""
    v = float(value)
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(v) >= scale:
            return f"{v / scale:.{digits}f}{unit}"
    return f"{v:.{digits}g}"


def duration(days: float) -> str:
    """Days for real runs, hours or minutes for small ones."""
    if days >= 1:
        return f"{days:.2f} days"
    if days * 24 >= 1:
        return f"{days * 24:.1f} hours"
    return f"{days * 24 * 60:.1f} minutes"


def checkpointing(training, n_layers: int) -> str:
    """A plan's activation checkpointing in words: 'off', 'on' (every block), '24 of 80 blocks'."""
    if not training.activation_checkpointing:
        return "off"
    if training.checkpointed_layers == n_layers:
        return "on"
    return f"{training.checkpointed_layers} of {n_layers} blocks"


def time_budget(spec_budget: dict) -> str | None:
    """A spec's time budget as it was given ('14 days', '200000 GPU-hours'); None for FLOPs."""
    if spec_budget.get("days") is not None:
        return f"{spec_budget['days']:g} days"
    if spec_budget.get("gpu_hours") is not None:
        return f"{spec_budget['gpu_hours']:g} GPU-hours"
    return None
