"""Analyses of trained checkpoints: weight-space and response-space drift from the base model."""

from opr.analysis.drift import (
    ATTN_MODULES,
    MLP_MODULES,
    SPECTRAL_MODULES,
    TopK,
    drift_summary,
    layer_index,
    module_type,
    next_token_kl,
    parameter_drift,
    principal_angles,
    spectral_drift,
    spectral_drift_matrix,
    summarize_spectral,
    top_k_svd,
)

__all__ = [
    "ATTN_MODULES",
    "MLP_MODULES",
    "SPECTRAL_MODULES",
    "TopK",
    "drift_summary",
    "layer_index",
    "module_type",
    "next_token_kl",
    "parameter_drift",
    "principal_angles",
    "spectral_drift",
    "spectral_drift_matrix",
    "summarize_spectral",
    "top_k_svd",
]
