"""Learning to Branch.

Guo, Lee & Ulbricht, "Learning to Branch for Multi-Task Learning", ICML 2020, arXiv:2006.01895. The backbone's stages
become the layers of a tree: layer ``l`` holds ``n_l`` nodes (copies of stage ``l``), the root is the input, and the
last layer holds one leaf per task. Every child node ``j`` of layer ``l`` picks one parent among the ``n_{l-1}`` nodes
of layer ``l - 1`` by a Gumbel-softmax sample over its learnable branching logits ``theta_j``::

    w_j = softmax((theta_j + g) / tau),  g_i = -log(-log(u_i)),  u_i ~ U(0, 1)
    input_j = sum_i w_j[i] * output_i

With ``straight_through`` (Jang et al., ICLR 2017; also LibMTL's choice) the forward pass uses the one-hot argmax of
``w_j``, exactly, and the backward pass the gradient of the relaxed ``w_j``. One tree is drawn per training
:meth:`~LTB.represent` call, from torch's global generator (so ``seed_everything`` makes it reproducible, and
ranks seeded alike draw the same tree). In evaluation the model is the paper's final discrete tree: each child reads
its most probable parent (argmax of ``theta_j``), and only the nodes on the tasks' paths run.

Temperature: ``tau`` is the buffer :attr:`LTB.temperature`; after every training sample it decays as
``tau <- max(min_temperature, tau * exp(-anneal_rate))`` (Jang et al.'s exponential schedule; ``anneal_rate=0`` keeps
it fixed), and :meth:`LTB.set_temperature` sets it, e.g. from a callback.

Shared parameters: which tasks use an inner node changes with every sample, so every inner node and its branching
logits are shared. A leaf and its logits feed only its task's representation: they are that task's own.

Deviations from LibMTL's LTB (the reference implementation): the widths of the inner layers are free (LibMTL: one
node per task everywhere); there is no warm-up that sums all parents; the temperature decays per sample, not per
epoch; the nodes are re-drawn independently by default so the branching logits get a gradient from the first step
(identical copies give every parent the same output, hence a zero logit gradient).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mtl.mtl.architectures.base import Architecture, split_stages


class LTB(Architecture):
    """A tree of copies of the backbone's stages whose branching is learnt by Gumbel-softmax sampling.

    Args:
        tasks: task names; task ``k`` is leaf ``k`` of the last layer.
        backbone: template split into stages with :func:`~lightning_mtl.mtl.architectures.split_stages` (an
            ``nn.Sequential`` of stages, or a module with ``stages()`` such as ``lightning_mtl.nn.Conv4``); needs at
            least two stages. Every node is a deep copy of its stage.
        widths: the number of nodes of every layer but the last (which has one leaf per task); default one node per
            task in every layer, as in LibMTL. ``widths[0] = 1`` shares the first stage among all tasks.
        temperature: initial Gumbel-softmax temperature ``tau``.
        min_temperature: floor of the annealed temperature.
        anneal_rate: ``r`` of the decay ``tau <- max(min_temperature, tau * exp(-r))`` after every training sample.
        straight_through: forward the one-hot argmax of each sample (gradients of the relaxed sample); ``False``
            forwards the relaxed mixture of the parents.
        independent_init: re-draw every node's parameters (each submodule's ``reset_parameters()``) so the nodes of
            a layer differ; ``False`` keeps the backbone's weights in every node (for a pretrained backbone).

    Raises:
        ValueError: fewer than two stages, bad ``widths``, non-positive temperatures, a negative ``anneal_rate``, or
            annealing with ``min_temperature > temperature``.
    """

    def __init__(
        self, tasks: list[str], backbone: nn.Module, widths: list[int] | None = None, temperature: float = 1.0,
        min_temperature: float = 0.5, anneal_rate: float = 0.0, straight_through: bool = True,
        independent_init: bool = True,
    ) -> None:
        super().__init__(tasks)
        stages = split_stages(backbone)
        if len(stages) < 2:
            raise ValueError(f"learning to branch needs a backbone of at least two stages, got {len(stages)}: give "
                             f"an nn.Sequential of stages")
        widths = [len(self.tasks)] * (len(stages) - 1) if widths is None else list(widths)
        if len(widths) != len(stages) - 1 or not all(isinstance(n, int) and n > 0 for n in widths):
            raise ValueError(f"widths must give one positive int per layer but the last ({len(stages) - 1} for "
                             f"{len(stages)} stages; the last has one leaf per task), got {widths}")
        if temperature <= 0 or min_temperature <= 0:
            raise ValueError(f"temperature and min_temperature must be > 0, got {temperature} and {min_temperature}")
        if anneal_rate < 0:
            raise ValueError(f"anneal_rate must be >= 0 (0 keeps the temperature fixed), got {anneal_rate}")
        if anneal_rate > 0 and min_temperature > temperature:
            raise ValueError(f"annealing needs min_temperature <= temperature, got {min_temperature} > {temperature}")
        self.widths = [*widths, len(self.tasks)]
        self.min_temperature, self.anneal_rate = min_temperature, anneal_rate
        self.straight_through = straight_through
        # nodes[l][j]: node j of layer l
        self.nodes = nn.ModuleList(nn.ModuleList(_copy(stage, independent_init) for _ in range(n))
                                   for stage, n in zip(stages, self.widths, strict=True))
        # logits[l - 1][j]: (n_{l-1},) branching logits of node j of layer l; zeros: every parent equally likely.
        # One Parameter per node, so that a leaf's logits can belong to its task.
        self.logits = nn.ModuleList(nn.ParameterList(nn.Parameter(torch.zeros(n_parent)) for _ in range(n_child))
                                    for n_parent, n_child in zip(self.widths[:-1], self.widths[1:], strict=True))
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def set_temperature(self, value: float) -> None:
        """Set the Gumbel-softmax temperature (for an external annealing schedule).

        Raises:
            ValueError: ``value <= 0``.
        """
        if value <= 0:
            raise ValueError(f"temperature must be > 0, got {value}")
        self.temperature.fill_(value)

    def probabilities(self) -> list[Tensor]:
        """The branching probabilities ``softmax(theta)`` of every layer but the first, ``(n_l, n_{l-1})``."""
        return [torch.softmax(torch.stack(list(layer)), dim=-1) for layer in self.logits]

    def parents(self) -> list[list[int]]:
        """The current discrete tree: the most probable parent of every node of every layer but the first."""
        best = torch.cat([torch.stack(list(layer)).argmax(-1) for layer in self.logits])
        flat = best.tolist()  # one device synchronisation: modules are chosen by Python indices
        splits, start = [], 0
        for n in self.widths[1:]:
            splits.append(flat[start:start + n])
            start += n
        return splits

    def paths(self) -> dict[str, list[int]]:
        """Task → the node it reads in every layer of the current discrete tree (root first, its leaf last)."""
        parents = self.parents()
        paths = {}
        for k, task in enumerate(self.tasks):
            path = [k]
            for layer in reversed(parents):
                path.append(layer[path[-1]])
            paths[task] = path[::-1]
        return paths

    def _sample(self) -> list[Tensor]:
        """One tree sample: the ``(n_l, n_{l-1})`` parent weights of every layer but the first, then annealing."""
        tau = self.temperature.clone()  # the buffer is decayed in place below, after the graph has used it
        weights = []
        for layer in self.logits:
            theta = torch.stack(list(layer))  # (n_l, n_{l-1})
            u = torch.rand_like(theta).clamp_min(torch.finfo(theta.dtype).tiny)  # global generator; no log(0)
            w = torch.softmax((theta - torch.log(-torch.log(u))) / tau, dim=-1)
            if self.straight_through:  # value exactly one-hot (w - w.detach() is exactly 0), gradient of w
                w = F.one_hot(w.argmax(-1), w.shape[-1]).to(w.dtype) + (w - w.detach())
            weights.append(w)
        if self.anneal_rate > 0:
            with torch.no_grad():
                self.temperature.mul_(math.exp(-self.anneal_rate)).clamp_(min=self.min_temperature)
        return weights

    def represent(self, x: Tensor, tasks: Sequence[str]) -> dict[str, Tensor]:
        leaves = [k for k, t in enumerate(self.tasks) if t in tasks]
        if not self.training:
            return self._represent_tree(x, leaves)
        weights = self._sample()
        # every inner node runs: a child's logit gradient needs the outputs of all its candidate parents
        outs = [node(x) for node in self.nodes[0]]
        for layer, w in zip(self.nodes[1:-1], weights[:-1], strict=True):
            outs = [node(_mix(w[j], outs)) for j, node in enumerate(layer)]
        return {self.tasks[k]: self.nodes[-1][k](_mix(weights[-1][k], outs)) for k in leaves}

    def _represent_tree(self, x: Tensor, leaves: list[int]) -> dict[str, Tensor]:
        """The argmax tree, running each node on the leaves' paths once."""
        parents = self.parents()
        needed = [set(leaves)]
        for layer in reversed(parents):
            needed.append({layer[j] for j in needed[-1]})
        needed.reverse()
        outs = {j: self.nodes[0][j](x) for j in sorted(needed[0])}
        for depth, layer in enumerate(parents, start=1):
            outs = {j: self.nodes[depth][j](outs[layer[j]]) for j in sorted(needed[depth])}
        return {self.tasks[k]: outs[k] for k in leaves}

    def task_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {t: [p for p in [*self.nodes[-1][k].parameters(), self.logits[-1][k]] if p.requires_grad]
                for k, t in enumerate(self.tasks)}


def _mix(w: Tensor, outs: list[Tensor]) -> Tensor:
    """``sum_i w[i] * outs[i]``: a (one-hot or relaxed) choice among the parents' outputs."""
    total = w[0] * outs[0]
    for wi, o in zip(w[1:], outs[1:], strict=True):
        total = total + wi * o
    return total


def _copy(stage: nn.Module, fresh: bool) -> nn.Module:
    """A deep copy of ``stage``, re-initialised by its submodules' ``reset_parameters()`` when ``fresh``."""
    node = copy.deepcopy(stage)
    if fresh:
        for module in node.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
    return node
