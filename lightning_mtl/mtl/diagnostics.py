"""Negative-transfer diagnostics from a ``(tasks, dims)`` matrix of per-task gradients on the shared parameters."""

from __future__ import annotations

import torch
from torch import Tensor


def gradient_diagnostics(matrix: Tensor, tasks: list[str], full_matrix_up_to: int = 16) -> dict[str, Tensor]:
    """Pairwise cosine similarities and gradient-norm ratios of task gradients.

    Returns ``cos_mean``, ``cos_min`` and ``conflict_frac`` (share of task pairs with negative cosine) over the pairs,
    ``grad_norm_ratio/<task>`` (the task's gradient norm over the mean norm) and, for at most ``full_matrix_up_to``
    tasks (16 by default: 120 pairs; beyond, the K² values would swamp the logger), every ``cos/<a>|<b>``.
    """
    m = matrix.float()
    norms = m.norm(dim=1)  # (K,)
    unit = m / norms.clamp_min(1e-12).unsqueeze(1)
    cos = unit @ unit.T  # (K, K)
    k = len(tasks)
    out: dict[str, Tensor] = {}
    if k > 1:
        i, j = torch.triu_indices(k, k, offset=1, device=m.device)
        pairs = cos[i, j]
        out.update(cos_mean=pairs.mean(), cos_min=pairs.min(), conflict_frac=(pairs < 0).float().mean())
        if k <= full_matrix_up_to:
            for a, b, c in zip(i.tolist(), j.tolist(), pairs, strict=True):
                out[f"cos/{tasks[a]}|{tasks[b]}"] = c
    mean_norm = norms.mean().clamp_min(1e-12)
    for t, n in zip(tasks, norms, strict=True):
        out[f"grad_norm_ratio/{t}"] = n / mean_norm
    return out
