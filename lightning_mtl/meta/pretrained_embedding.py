"""A pre-trained embedding evaluated on few-shot episodes.

Tian, Wang, Krishnan, Tenenbaum & Isola, "Rethinking Few-Shot Image Classification: a Good Embedding Is All You
Need?", ECCV 2020, arXiv:2003.11539.

Training is ordinary (multi-class) supervised learning: a linear classifier ``W f(x) + b`` over all the training
classes on the backbone embedding ``f``, trained with cross-entropy on :class:`~lightning_mtl.batches.LabelledBatch`
batches (a datamodule with ``train_mode="classes"``). Evaluation discards the classifier and solves each episode on
the frozen features ``z = f(x)``, L2-normalised (``z / ||z||``, which Tian et al. find helps) unless turned off:

* ``"prototypes"``: nearest class mean, c_k = mean_{(x, y) in S_k} z(x); logits ``-||z(q) - c_k||^2`` (``"euclidean"``,
  as ProtoNet) or ``cos(z(q), c_k)`` (``"cosine"``);
* ``"logistic"``: multinomial logistic regression fitted on the support set by L-BFGS (Tian et al.'s classifier),
  minimising ``mean CE + ||W||^2 / (2 C n)`` over ``n`` support examples, the minimiser of scikit-learn's
  ``LogisticRegression(C=C)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_mtl.batches import Episode, LabelledBatch
from lightning_mtl.checkpointing import save_hyperparameters
from lightning_mtl.meta.base import EpisodicModule
from lightning_mtl.meta.protonet import prototypes, squared_euclidean_logits
from lightning_mtl.nn import Conv4
from lightning_mtl.nn.probe import feature_dim


def logistic_regression_logits(support: Tensor, labels: Tensor, query: Tensor, ways: int, c: float = 1.0,
                               steps: int = 100) -> Tensor:
    """Query logits ``(B, Q, ways)`` of a logistic regression fitted on each episode's ``support`` ``(B, S, D)``.

    The episodes' objectives are independent, so one L-BFGS run on their sum fits all of them. Works under
    ``torch.inference_mode`` (Lightning's evaluation loops): the fit leaves it locally.

    Args:
        support: ``(B, S, D)`` support features.
        labels: ``(B, S)`` support labels in ``0 .. ways - 1``.
        query: ``(B, Q, D)`` query features.
        ways: classes per episode.
        c: inverse L2 regularisation strength (scikit-learn's ``C``); the bias is not penalised.
        steps: maximum L-BFGS iterations.

    Returns:
        ``(B, Q, ways)`` logits ``query @ W + b``, detached.
    """
    with torch.inference_mode(False), torch.enable_grad():
        support, query = support.detach().clone(), query.detach().clone()  # normal tensors, out of inference mode
        b, n, d = support.shape
        weight = torch.zeros(b, d, ways, dtype=support.dtype, device=support.device, requires_grad=True)
        bias = torch.zeros(b, 1, ways, dtype=support.dtype, device=support.device, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            logits = support @ weight + bias  # (B, S, ways)
            ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / n
            loss = ce + weight.pow(2).sum() / (2 * c * n)
            loss.backward()
            return loss

        optimizer.step(closure)
        return (query @ weight + bias).detach()


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> str:
    """Load into ``backbone`` the weights of the module in checkpoint ``path`` that has exactly its parameters and
    buffers (names and shapes): a multi-task model's shared backbone (``architecture.backbone.*``), another few-shot
    model's backbone, or a plain state dict. Loaded weights-only.

    Returns:
        The prefix the weights were found under (``""`` for a backbone's own state dict).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: no module of the checkpoint matches the backbone (the message lists the closest prefixes).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint {path} not found; give the path of a .ckpt written by fit.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    own = backbone.state_dict()
    first = next(iter(own))
    prefixes = sorted({k[: -len(first)] for k in state if k.endswith(first)}, key=len)
    for prefix in prefixes:
        if all(prefix + k in state and state[prefix + k].shape == v.shape for k, v in own.items()):
            backbone.load_state_dict({k: state[prefix + k] for k in own})
            return prefix
    raise ValueError(f"{path}: no module with the backbone's {len(own)} tensors (first {first!r}); candidates "
                     f"{prefixes or 'none'}. Give the backbone the checkpoint was trained with (same class and "
                     f"arguments).")


class EmbeddingBaseline(EpisodicModule):
    """Supervised pre-training on all training classes, few-shot evaluation on the frozen embedding (Tian et al.).

    Args:
        backbone: embedding network mapping ``(N, C, H, W)`` images to ``(N, D)``; default :class:`Conv4` for
            ``image_shape[0]`` channels.
        num_classes: training classes of the linear classifier; ``None`` takes the datamodule's
            ``num_train_classes`` when the trainer configures the model (``configure_model``).
        image_shape: ``(C, H, W)`` of the inputs, used once to size the classifier.
        normalize: L2-normalise the features before the evaluation classifier.
        classifier: evaluation classifier: ``"prototypes"`` (nearest class mean) or ``"logistic"``.
        distance: distance to the prototypes: ``"euclidean"`` (squared) or ``"cosine"``.
        logistic_c: inverse L2 regularisation of the logistic regression (scikit-learn's ``C``; Tian et al.: 1).
        logistic_steps: maximum L-BFGS iterations of the logistic regression.
        pretrained: a checkpoint whose backbone weights are loaded at construction
            (:func:`load_backbone_weights`): evaluate, on episodes, the embedding of another model, e.g. the shared
            backbone of a multi-task model trained with one task per background alphabet (multi-task pre-training
            for few-shot learning; ``recipes/configs/omniglot/multitask_embedding_lake_5w1s.yaml``).
        optimizer: optimizer factory; default Adam, lr 1e-3.
        lr_scheduler: scheduler factory, stepped every training step.

    Raises:
        ValueError: an unknown ``classifier`` or ``distance``, or a non-positive ``logistic_c`` or ``logistic_steps``.
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        num_classes: int | None = None,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        normalize: bool = True,
        classifier: Literal["prototypes", "logistic"] = "prototypes",
        distance: Literal["euclidean", "cosine"] = "euclidean",
        logistic_c: float = 1.0,
        logistic_steps: int = 100,
        pretrained: str | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler)
        if classifier not in ("prototypes", "logistic"):
            raise ValueError(f"classifier must be 'prototypes' or 'logistic', got {classifier!r}")
        if distance not in ("euclidean", "cosine"):
            raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")
        if logistic_c <= 0 or logistic_steps < 1:
            raise ValueError(f"logistic_c must be > 0 and logistic_steps >= 1, got {logistic_c} and {logistic_steps}")
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        save_hyperparameters(self, ["backbone", "optimizer", "lr_scheduler"])
        self.backbone = backbone if backbone is not None else Conv4(in_channels=image_shape[0])
        if pretrained is not None:
            load_backbone_weights(self.backbone, pretrained)
        self.feature_dim = feature_dim(self.backbone, image_shape)
        self.head: nn.Linear | None = None if num_classes is None else nn.Linear(self.feature_dim, num_classes)

    def configure_model(self) -> None:
        """With ``num_classes=None``, size the classifier by the datamodule's ``num_train_classes``."""
        if self.head is not None:
            return
        datamodule = self.trainer.datamodule
        num_classes = getattr(datamodule, "num_train_classes", None)
        if not num_classes:
            raise ValueError(f"EmbeddingBaseline(num_classes=None) takes the number of training classes from the "
                             f"datamodule's `num_train_classes`, but {type(datamodule).__name__} has none; pass "
                             f"model num_classes explicitly.")
        self.head = nn.Linear(self.feature_dim, num_classes)
        self.hparams["num_classes"] = num_classes  # so that checkpoints rebuild the classifier at load time

    def forward(self, x: Tensor) -> Tensor:
        """Embeddings ``(N, D)`` of images ``(N, C, H, W)``."""
        return self.backbone(self.images(x)).flatten(1)

    def training_step(self, batch: LabelledBatch, batch_idx: int) -> Tensor:
        if not isinstance(batch, LabelledBatch):
            raise TypeError(f"EmbeddingBaseline trains on LabelledBatch(x, y) batches of all training classes, got "
                            f"{type(batch).__name__}; set the datamodule's train_mode to 'classes' "
                            f"(--data.episodes.train_mode classes).")
        if self.head is None:
            raise RuntimeError("EmbeddingBaseline has no classifier: pass num_classes or train through a Trainer "
                               "whose datamodule has num_train_classes.")
        logits = self.head(self(batch.x))  # (N, num_classes)
        loss = F.cross_entropy(logits.float(), batch.y)
        if self.logs_this_step():
            n = len(batch.y)
            self.log("train/loss", loss, prog_bar=True, batch_size=n)
            self.log("train/acc", (logits.argmax(-1) == batch.y).float().mean(), prog_bar=True, batch_size=n)
        return loss

    def episode_logits(self, episode: Episode, stage: str) -> Tensor:
        support, query = (z.float() for z in self.embed_episode(episode))
        if self.hparams.normalize:
            support, query = F.normalize(support, dim=-1), F.normalize(query, dim=-1)
        hp = self.hparams
        # the classifier runs in float32 even under mixed precision: its matmuls are tiny, bf16 would cost accuracy
        with torch.autocast(support.device.type, enabled=False):
            if hp.classifier == "logistic":
                return logistic_regression_logits(support, episode.support_y, query, episode.ways, hp.logistic_c,
                                                  hp.logistic_steps)
            protos = prototypes(support, episode.support_y, episode.ways)  # (B, ways, D)
            if hp.distance == "cosine":
                return F.normalize(query, dim=-1) @ F.normalize(protos, dim=-1).transpose(1, 2)  # (B, Q, ways)
            return squared_euclidean_logits(query, protos)
