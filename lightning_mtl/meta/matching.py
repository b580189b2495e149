"""Matching Networks.

Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, "Matching Networks for One Shot Learning", NeurIPS 2016,
arXiv:1606.04080.

A query x is labelled by attention over the support set S = {(x_i, y_i)}:

    P(y = k | x, S) = sum_i a(x, x_i) 1[y_i = k],    a(x, x_i) = softmax_i cos(f(x), g(x_i)),

trained by maximising log P(y | x, S) on episodes that match the test conditions (same N-way K-shot).
:meth:`MatchingNetwork.episode_logits` returns log P, clamped below at ``log(1e-8)`` so that a class with no attention
gives a finite loss; since the probabilities sum to one, the base class' cross-entropy on these logits is -log P,
the paper's loss.

Full context embeddings (``fce=True``, appendix A of the paper): g(x_i, S) = h→_i + h←_i + g'(x_i), a bidirectional
LSTM over the support embeddings g' with a skip connection, and f(x, S) = attLSTM(f'(x), g(S), K):

    ĥ_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1}),    h_k = ĥ_k + f'(x),
    r_{k-1} = sum_i softmax_i(h_{k-1}ᵀ g(x_i, S)) g(x_i, S),    f(x, S) = h_K,

with h_0 = f'(x) and c_0 = 0. The read-out r enters the LSTM cell next to f'(x) rather than next to h: the gates are
linear in [f'(x), h, r] either way, and the state keeps the embedding size. f' = g' is one shared embedding network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtl.batches import Episode
from lightning_mtl.checkpointing import save_hyperparameters
from lightning_mtl.meta._checks import class_one_hot
from lightning_mtl.meta.base import EpisodicModule
from lightning_mtl.mtl.balancing import BalancerCallable
from lightning_mtl.nn import Conv4
from lightning_mtl.nn.probe import feature_dim

#: smallest probability before the log: log P >= log(1e-8) ≈ -18.4
PROB_FLOOR = 1e-8


def matching_log_probs(query: Tensor, support: Tensor, support_y: Tensor, ways: int, scale: float = 1.0) -> Tensor:
    """log P(y = k | x, S) ``(B, Q, ways)`` of ``query`` ``(B, Q, D)`` given ``support`` ``(B, S, D)``.

    Args:
        query: query embeddings f(x).
        support: support embeddings g(x_i).
        support_y: ``(B, S)`` support labels in ``0 .. ways - 1``.
        ways: number of classes.
        scale: multiplies the cosine similarities before the softmax (1 in the paper).

    Returns:
        Log-probabilities, clamped below at ``log(1e-8)``.
    """
    cos = F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).transpose(1, 2)  # (B, Q, S)
    attention = (scale * cos).softmax(-1)
    onehot = class_one_hot(support_y, ways, attention.dtype)  # (B, S, W)
    return (attention @ onehot).clamp_min(PROB_FLOOR).log()


class FullContextEmbedding(nn.Module):
    """The paper's full context embeddings: bidirectional LSTM g over the support set, attention LSTM f for queries.

    Args:
        dim: embedding size D of f' = g' (also the LSTM hidden size, so that the skip connections add up).
        steps: K, the read-out steps of the attention LSTM.
    """

    def __init__(self, dim: int, steps: int) -> None:
        super().__init__()
        self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        self.query_cell = nn.LSTMCell(2 * dim, dim)
        self.steps = steps

    def forward(self, query: Tensor, support: Tensor) -> tuple[Tensor, Tensor]:
        """``(f(x, S), g(S))`` of query ``(B, Q, D)`` and support ``(B, S, D)`` embeddings, same shapes."""
        b, q, d = query.shape
        both, _ = self.support_lstm(support)  # (B, S, 2D): forward and backward hidden states
        g = support + both[..., :d] + both[..., d:]
        fq = query.reshape(b * q, d)
        h, c = fq, torch.zeros_like(fq)
        for _ in range(self.steps):
            attention = (h.view(b, q, d) @ g.transpose(1, 2)).softmax(-1)  # (B, Q, S), dot-product as in the paper
            read = (attention @ g).reshape(b * q, d)
            h_hat, c = self.query_cell(torch.cat([fq, read], -1), (h, c))
            h = h_hat + fq
        return h.view(b, q, d), g


class MatchingNetwork(EpisodicModule):
    """Matching network: cosine attention over the support set, optionally with full context embeddings.

    Args:
        backbone: embedding network f' = g' mapping ``(N, C, H, W)`` images to ``(N, D)``; default :class:`Conv4` for
            one-channel images (the paper's Omniglot embedding).
        fce: use full context embeddings (the paper uses them on miniImageNet, not on Omniglot).
        fce_steps: K, read-out steps of the attention LSTM (not reported in the paper).
        image_shape: ``(C, H, W)`` of the inputs, used once to size the LSTMs when ``fce`` is on.
        cosine_scale: multiplies the cosine similarities before the attention softmax; 1 is the paper's attention,
            larger values sharpen it (TADAM's metric scaling, Oreshkin et al. 2018). A backbone ending in ReLU (Conv-4)
            gives non-negative features, so cosines lie in [0, 1] and at scale 1 the attention can put at most
            e / (e + 4) ≈ 40% on the right example of a 5-way 1-shot episode: the loss saturates (a far lower
            Omniglot 5-way 1-shot accuracy at scale 1: docs/history.md); the quick Omniglot config uses 10.
        optimizer: optimizer factory; default Adam, lr 1e-3.
        lr_scheduler: scheduler factory, stepped every episode batch.
        meta_balancer: gradient aggregator of the per-episode outer gradients of a meta-batch (``pcgrad``, ``mgda``,
            ``upgrad``, ...; see :class:`~lightning_mtl.meta.EpisodicModule`); ``None``: their mean.
        diagnostics_every: with a ``meta_balancer``, log the episode-gradient conflict (``diag/*``) every this many
            steps.

    Raises:
        ValueError: ``fce_steps < 1`` with ``fce`` on, or ``cosine_scale <= 0``.
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        fce: bool = False,
        fce_steps: int = 5,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        cosine_scale: float = 1.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        meta_balancer: str | BalancerCallable | None = None,
        diagnostics_every: int = 100,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, meta_balancer=meta_balancer,
                         diagnostics_every=diagnostics_every)
        if fce and fce_steps < 1:
            raise ValueError(f"fce_steps must be >= 1 with full context embeddings, got {fce_steps}")
        if cosine_scale <= 0:
            raise ValueError(f"cosine_scale must be > 0, got {cosine_scale}")
        save_hyperparameters(self, ["backbone", "optimizer", "lr_scheduler"])
        self.backbone = backbone if backbone is not None else Conv4(in_channels=image_shape[0])
        self.fce = FullContextEmbedding(feature_dim(self.backbone, image_shape), fce_steps) if fce else None

    def forward(self, x: Tensor) -> Tensor:
        """Embeddings ``(N, D)`` of images ``(N, C, H, W)``."""
        return self.backbone(self.images(x)).flatten(1)

    def episode_logits(self, episode: Episode, stage: str) -> Tensor:
        """log P(y | x, S) ``(B, ways * queries, ways)`` of the queries; see the module docstring."""
        support, query = (z.float() for z in self.embed_episode(episode))
        if self.fce is not None:
            query, support = self.fce(query, support)
        return matching_log_probs(query, support, episode.support_y, episode.ways, self.hparams.cosine_scale)
