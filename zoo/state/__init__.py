"""Recurrent state: statistics over position (the state-collapse diagnosis) and training-free mitigations.

    from zoo.state import apply_mitigation, record_state_statistics, plot_state_statistics
    apply_mitigation(model, "forget:c_alpha=0.999,c_b=0.7")     # or norm:threshold=..., window:r=...
    stats = record_state_statistics(model, input_ids, chunk_size=1024, train_length=2048)
    plot_state_statistics(stats, "results/state")

``zoo eval state`` (zoo/eval/state.py) runs both from the command line.
"""

from __future__ import annotations

from zoo.state.mitigation import (
    add_mitigation_argument,
    apply_mitigation,
    cap_state,
    format_spec,
    head_view,
    is_neutral,
    normalize_spec,
    parse_mitigation,
    recurrent_mixers,
    windowed_scan,
)
from zoo.state.recorder import (
    StateRecorder,
    calibrate_norm_threshold,
    check_recurrent,
    chunk_ends,
    plot_state_statistics,
    record_state_statistics,
    state_statistics,
)

__all__ = [
    "StateRecorder",
    "add_mitigation_argument",
    "apply_mitigation",
    "calibrate_norm_threshold",
    "check_recurrent",
    "cap_state",
    "chunk_ends",
    "format_spec",
    "head_view",
    "is_neutral",
    "normalize_spec",
    "parse_mitigation",
    "plot_state_statistics",
    "record_state_statistics",
    "recurrent_mixers",
    "state_statistics",
    "windowed_scan",
]
