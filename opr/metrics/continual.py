"""Continual-learning metrics over the accuracy matrix.

R has T+1 rows and T columns on one 0-100 scale: row 0 is before any training, row s (1..T) after training
on task s; column j is task j (1-based in the formulas, 0-based in code). Formulas (TRACE's conventions):

- OP   = (1/T) Σ_j R[T, j]
- BWT  = 1/(T-1) Σ_{j<T} (R[T, j] - R[j, j])          (TRACE divides by T-1)
- BWT_1overT = (1/T) Σ_{j<T} (R[T, j] - R[j, j])      (papers that divide by T, the last term being zero)
- FWT  = 1/(T-1) Σ_{j>1} (R[j-1, j] - R[0, j])        (zero-shot gain before training on task j)
- MaxDrop = 1/(T-1) Σ_{j<T} (R[j, j] - min_{s>j} R[s, j])  (the deepest fall after a task's own stage;
  BWT only sees the end, and output-format biases often recover on their own later)

BWT, BWT_1overT, FWT and MaxDrop are ``None`` when T = 1.

- LA   = (1/T) Σ_j R[j, j]                           (learning accuracy: each task right after its own stage;
  how far a method specialises, before any forgetting)
- general_drift = mean(G[last]) - mean(G[0]) over the general-ability sets' matrix G (rows as R's)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional


def _check(matrix: Sequence[Sequence[float]]) -> int:
    T = len(matrix) - 1
    if T < 1 or any(len(row) != T for row in matrix):
        shape = [len(r) for r in matrix]
        raise ValueError(f"accuracy matrix must have T+1 rows of T scores (T >= 1); got row lengths {shape}")
    return T


def continual_metrics(matrix: Sequence[Sequence[float]]) -> dict[str, Optional[float]]:
    """OP, BWT, BWT_1overT, FWT and MaxDrop of a complete (T+1) x T accuracy matrix."""
    R = matrix
    T = _check(R)
    out: dict[str, Optional[float]] = {"OP": sum(R[T]) / T}
    if T == 1:
        out.update(BWT=None, BWT_1overT=None, FWT=None, MaxDrop=None)
        return out
    # Task j (1-based) sits in column j-1 and was trained at row j.
    back = [R[T][j - 1] - R[j][j - 1] for j in range(1, T)]
    out["BWT"] = sum(back) / (T - 1)
    out["BWT_1overT"] = sum(back) / T
    # Task j's zero-shot gain: row j-1 (trained up to task j-1, 1-based) minus row 0, column j-1 (0-based).
    out["FWT"] = sum(R[j - 1][j - 1] - R[0][j - 1] for j in range(2, T + 1)) / (T - 1)
    out["MaxDrop"] = sum(R[j][j - 1] - min(R[s][j - 1] for s in range(j + 1, T + 1)) for j in range(1, T)) / (T - 1)
    return out


def learning_accuracy(matrix: Sequence[Sequence[float]]) -> float:
    """LA: the mean of the diagonal R[j, j] (task j right after its own stage) of a (T+1) x T matrix.

    ``learning_accuracy([[0, 0], [100, 0], [100, 90]]) == 95.0``."""
    T = _check(matrix)
    return sum(matrix[j][j - 1] for j in range(1, T + 1)) / T


def general_drift(general: Sequence[Sequence[float]]) -> Optional[float]:
    """Mean general-ability score of the last row minus that of row 0; ``None`` without general sets.

    Shapes: general [rows, sets] (rows as the accuracy matrix's) -> a float on the 0-100 scale.
    ``general_drift([[58.0, 42.0], [10.0, 20.0]]) == -35.0``."""
    if not general or not general[0]:
        return None
    return sum(general[-1]) / len(general[-1]) - sum(general[0]) / len(general[0])
