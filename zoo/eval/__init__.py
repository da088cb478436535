"""Evaluation on the Hugging Face causal-LM interface: synthetic recall, passkey retrieval, length curves.

Each module has a ``main(argv)`` behind ``zoo eval synthetic|passkey|length``.
"""

from __future__ import annotations

from zoo.eval.common import iter_chunk_logits, load_model
from zoo.eval.length import evaluate_length, log_bins, per_position_loss, plot_length_curves
from zoo.eval.passkey import (
    build_passkey_prompt,
    check_passkey,
    evaluate_passkey,
    greedy_generate,
    plot_passkey_heatmap,
)
from zoo.eval.synthetic import evaluate_synthetic, plot_synthetic_accuracy, predict_answers

__all__ = [
    "build_passkey_prompt",
    "check_passkey",
    "evaluate_length",
    "evaluate_passkey",
    "evaluate_synthetic",
    "greedy_generate",
    "iter_chunk_logits",
    "load_model",
    "log_bins",
    "per_position_loss",
    "plot_length_curves",
    "plot_passkey_heatmap",
    "plot_synthetic_accuracy",
    "predict_answers",
]
