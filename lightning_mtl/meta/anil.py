"""ANIL: Almost No Inner Loop.

Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse? Towards Understanding the Effectiveness of MAML",
ICLR 2020, arXiv:1909.09157.

The network is a backbone f_theta followed by a linear head (w, b). MAML adapts every parameter in the inner loop;
ANIL adapts the head only, on features computed once per task:

    z_s = f_theta(x_support),  z_q = f_theta(x_query)
    (w, b)'_i = (w, b) - alpha * grad_{(w, b)} CE(w z_s + b, y_support)      (repeated ``inner_steps`` times)
    meta loss = mean_i CE(w'_i z_q + b'_i, y_query)

The outer optimizer trains theta and (w, b). The second-order meta-gradient differentiates through the head updates
(and so through z_s into theta); with ``first_order=True`` the inner gradients are constants and theta only receives
the gradient through z_q. Evaluation adapts the head on the support set in the same way. The update rule and every
argument are :class:`~lightning_mtl.meta.maml.MAML`'s (the paper keeps MAML's architecture and hyper-parameters);
what differs is what the core's inner loop adapts (:meth:`ANIL.fast_parameters`) and that it reuses the support
features (:meth:`ANIL.inner_logits`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call

from lightning_mtl.meta.gradient_based import _part
from lightning_mtl.meta.maml import MAML


class ANIL(MAML):
    """ANIL classifier: ``backbone`` → linear head of ``ways`` outputs; only the head is adapted per task.

    Args:
        ways: classes per episode (size of the head); must match the datamodule's ways.
        backbone: feature extractor ``(N, C, H, W) → (N, D)``; default :class:`Conv4` without running BatchNorm
            statistics (transductive). It is never adapted in the inner loop.
        image_shape: ``(C, H, W)`` of the inputs, used once to size the head.
        inner_lr: step size alpha of the head updates during training.
        inner_steps: head updates during training.
        eval_inner_lr: step size at validation / test; ``None`` uses ``inner_lr``.
        eval_inner_steps: head updates at validation / test.
        first_order: treat the inner gradients as constants (no differentiation through the head updates).
        optimizer: outer optimizer factory (backbone and head); default Adam, lr 1e-3.
        lr_scheduler: outer scheduler factory, stepped every meta-batch.
    """

    def fast_parameters(self) -> dict[str, Tensor]:
        """The head's parameters only: the backbone is never adapted."""
        return dict(self.head.named_parameters(prefix="head"))

    def inner_logits(self, x: Tensor, create_graph: bool):
        """The backbone runs once on ``x``; the inner loop only re-runs the head on its features."""
        # First order needs no path from the support features back to the backbone: skip recording it.
        with torch.set_grad_enabled(create_graph):
            z = self.features(x)  # (ways * shots, D)
        return lambda params: functional_call(self.head, _part(params, "head."), (z,))
