"""Training-step cost of MultiTaskModule: its balancing methods, its architectures, and its gradient plumbing against
torchjd and LibMTL.

    python recipes/benchmarks/mtl_overhead.py                                  # CPU, K = 4 and 50, everything
    python recipes/benchmarks/mtl_overhead.py --accelerator cuda --backbone conv4 --methods equal pcgrad upgrad

On one synthetic data set (``--batch-size`` random 1x28x28 inputs, ``--classes`` random labels per task) and one
``--backbone`` (the same initialisation everywhere; the MLP is an ``nn.Sequential`` of three [Linear, ReLU] stages,
Conv-4 has four conv blocks), it times, with one linear head per task:

* every ``--methods`` name in MultiTaskModule on hard sharing through a Lightning Trainer, relative to ``equal`` at
  the same K; loss weightings once, gradient aggregators at ``level="parameter"`` (once per ``--jacobians`` mode,
  shown as ``parameter:<mode>`` unless ``auto``) and ``level="representation"``;
* ``torch:equal``: a plain PyTorch loop on the sum of the losses (the floor: one backward pass, no framework);
* ``torchjd:<name>`` for every ``--torchjd`` name: a plain PyTorch loop with ``torchjd.autojac.mtl_backward`` +
  ``jac_to_grad`` and the same torchjd aggregator object our registry builds (these names are also timed in ours);
* every ``--architectures`` name (default: all of ``list_architectures()``) at ``equal``, through the Trainer:
  ``vs hard`` (JSON ``ratio_vs_hard``) is its step time over hard sharing's with the same backbone, i.e. the cost
  of its copies, experts, gates, units or attention. Backbone-based architectures get the backbone (split into its
  stages by those that interleave with stages: cross-stitch, MTAN, PLE, LTB); expert-based ones (MMoE, CGC,
  DSelect-k) get it as the expert, ``--experts`` shared experts and ``--task-experts`` per task (CGC, PLE), and the
  input shape for their gates. An architecture that cannot take the backbone is skipped with its reason (MTAN
  attends to (C, H, W) maps: not the MLP's);
* ``fwd/step`` (JSON ``shared_forwards_per_step``): in the last warm-up step (the first step with ``--warmup 0``)
  of each architecture's first run, forward hooks count how often every copy of the backbone or of one of its
  stages inside the architecture (the backbone, soft-sharing copies, cross-stitch columns' stages, experts, LTB
  nodes; found by their structure) runs. Each must run exactly once per step (shown as ``1 (n)`` for n copies):
  more would recompute what tasks share;
* ``libmtl:<name>`` for every ``--libmtl`` name (``equal`` -> LibMTL's EW, ``pcgrad`` -> PCGrad) on LibMTL 1.1.5's
  HPS, MMoE and CGC (those of ``--architectures``; hard sharing always) with the same backbone, experts and heads.
  LibMTL's ``Trainer`` hard-codes ``cuda:0`` and its loop computes metrics each step, so it is not run: the model
  is assembled as its ``Trainer._prepare_model`` does (``class MTLmodel(arch, weighting)``) on our device, and a
  bare loop runs what its training loop runs per step (forward, the (K,) loss tensor, ``zero_grad``, the
  weighting's ``backward``, ``step``). Two fixes, both in gradient-matrix methods (PCGrad), none in EW: their
  ``zero_grad_share_params`` calls ``Module.zero_grad()``, which sets gradients to ``None`` since torch 2.0, before
  writing into ``param.grad.data`` (an AttributeError): here it zeroes them in place, as torch 1.x did; their
  ``_grad2vec`` flattens each gradient with ``view(-1)``, which fails on Conv-4's channels-last gradients: here the
  same vector comes from ``reshape`` and one ``cat``. ``ours/libmtl`` (JSON ``ratio_vs_libmtl``) divides our
  step (Lightning's loop, checks) by LibMTL's bare one for the same method, architecture and level (LibMTL's
  ``rep_grad=False``: parameter level). LibMTL is imported with a shim for ``torchvision.models.utils`` (gone
  from current torchvision); if it cannot be imported its rows are skipped and the reason printed.

Timing starts after ``--warmup`` steps; runs alternate in order, then in reverse order, ``--repeats`` times, and
the median ms/step of each is reported. ``ours/torchjd`` divides our time by torchjd's for the same aggregator. It
compares whole steps: ours includes Lightning's loop and the module's checks (target range, finiteness), torchjd's
and LibMTL's are bare loops, and at ``level="representation"`` ours aggregates a different matrix (task gradients
w.r.t. the shared representation) than torchjd (the Jacobian w.r.t. the shared parameters, from one vmapped backward).
On CPUs shared with other jobs pass ``--threads 1``: OpenMP threads spin-waiting for a busy core can slow a step many
times over.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import statistics
import sys
import time
import types
import warnings
from functools import partial
from importlib.metadata import version

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchjd.autojac import jac_to_grad, mtl_backward

from lightning_mtl import MultiTaskBatch
from lightning_mtl.callbacks import StepTimer
from lightning_mtl.mtl import MultiTaskModule
from lightning_mtl.mtl.architectures import ArchitectureCallable, list_architectures, split_stages
from lightning_mtl.mtl.balancing import GradientAggregator, balancer_class, list_balancers
from lightning_mtl.mtl.balancing.torchjd_aggregator import TorchJDAggregator
from lightning_mtl.nn import Conv4
from lightning_mtl.records import provenance, table, write_json

INPUT_SHAPE = (1, 28, 28)
HARD = "HardSharing"
LIBMTL_WEIGHTINGS = {"equal": "EW", "pcgrad": "PCGrad"}  # our name -> LibMTL's, same method
LIBMTL_ARCHITECTURES = {HARD: "HPS", "MMoE": "MMoE", "CGC": "CGC"}


def make_backbone(kind: str, hidden: int) -> nn.Module:
    if kind == "conv4":
        return Conv4(in_channels=INPUT_SHAPE[0], hidden_channels=hidden, out_channels=hidden)
    # stages (for cross-stitch, PLE, LTB): 784-h, h-h, h-h
    return nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, hidden), nn.ReLU()),
                         nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU()),
                         nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU()))


def make_architecture(args, name: str) -> ArchitectureCallable:
    """``name`` on a fresh ``--backbone``: given as ``backbone`` or as ``expert`` (whichever its constructor takes),
    with ``--experts``/``--task-experts`` and the input's shape, channels and size where it takes them."""
    cls = list_architectures()[name]
    params = inspect.signature(cls).parameters
    backbone = make_backbone(args.backbone, args.hidden)
    if "backbone" in params:
        kwargs = {"backbone": backbone}
    elif "expert" in params:
        kwargs = {"expert": backbone}
    else:
        raise ValueError(f"{name} takes neither a backbone nor an expert; this benchmark cannot build it")
    for arg, value in (("num_experts", args.experts), ("num_shared_experts", args.experts),
                       ("num_task_experts", args.task_experts), ("input_shape", INPUT_SHAPE),
                       ("in_channels", INPUT_SHAPE[0]), ("probe_size", INPUT_SHAPE[-1])):
        if arg in params:
            kwargs[arg] = value
    return partial(cls, **kwargs)


def make_module(args, k: int, method: str = "equal", level: str = "parameter", jacobian: str = "auto",
                architecture: str = HARD) -> MultiTaskModule:
    torch.manual_seed(0)  # the same backbone and heads for every run at this K
    return MultiTaskModule(num_classes={f"t{i}": args.classes for i in range(k)},
                           architecture=make_architecture(args, architecture), balancer=method, level=level,
                           jacobian=jacobian, diagnostics_every=0,
                           optimizer=lambda params: torch.optim.Adam(params, lr=1e-3))


def make_batches(args, k: int) -> list[MultiTaskBatch]:
    g = torch.Generator().manual_seed(1)
    return [MultiTaskBatch(torch.randn(args.batch_size, *INPUT_SHAPE, generator=g),
                           {f"t{i}": torch.randint(0, args.classes, (args.batch_size,), generator=g) for i in range(k)})
            for _ in range(args.steps)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------- shared-forward check
def _signature(module: nn.Module) -> tuple:
    """A module's structure: every submodule's relative name, type and own parameter shapes."""
    return tuple((name, type(m).__name__, tuple(tuple(p.shape) for p in m.parameters(recurse=False)))
                 for name, m in module.named_modules())


def copy_signatures(backbone: nn.Module) -> set[tuple]:
    """Structures of the backbone and of each of its stages: what an architecture's copies of them look like."""
    try:
        stages = split_stages(backbone)
    except TypeError:  # a backbone without stages: only whole copies
        stages = []
    return {_signature(backbone), *(_signature(s) for s in stages)}


def backbone_copies(architecture: nn.Module, signatures: set[tuple]) -> dict[str, nn.Module]:
    """Qualified name -> every outermost submodule of ``architecture`` structured like the backbone or a stage."""
    found: dict[str, nn.Module] = {}
    for name, m in architecture.named_modules():
        if not any(name.startswith(f"{p}.") for p in found) and _signature(m) in signatures:
            found[name] = m
    return found


class ForwardCounter:
    """Within ``with``: how many times each part ran, counted on its parameterised leaf modules (a stage may be
    called directly rather than through its parent, as MTAN calls the backbone's stages); a part's count is the
    largest of its leaves' (a leaf run twice is a recomputation)."""

    def __init__(self, parts: dict[str, nn.Module]) -> None:
        self.parts, self.calls, self._handles = parts, {}, []

    def __enter__(self) -> ForwardCounter:
        for name, part in self.parts.items():
            leaves = [m for m in part.modules() if next(m.parameters(recurse=False), None) is not None] or [part]
            for i, leaf in enumerate(leaves):
                self.calls[(name, i)] = 0
                self._handles.append(leaf.register_forward_hook(partial(self._count, (name, i))))
        return self

    def _count(self, key: tuple[str, int], *_) -> None:
        self.calls[key] += 1

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    @property
    def counts(self) -> dict[str, int]:
        return {name: max(n for (part, _), n in self.calls.items() if part == name) for name in self.parts}


class SharedForwards(L.Callback):
    """Counts the forward calls of every backbone copy in the architecture during training step ``step``."""

    def __init__(self, step: int, signatures: set[tuple]) -> None:
        self.step, self.signatures, self.counter = step, signatures, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.step:
            self.counter = ForwardCounter(backbone_copies(pl_module.architecture, self.signatures)).__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.step:
            self.counter.__exit__(None, None, None)


# ---------------------------------------------------------------------- timed loops
def time_lightning(args, k: int, method: str, level: str, batches: list[MultiTaskBatch], architecture: str = HARD,
                   counter: SharedForwards | None = None) -> float:
    level, _, jacobian = level.partition(":")  # "parameter:vmap" -> level "parameter", jacobian "vmap"
    model = make_module(args, k, method, level, jacobian or "auto", architecture)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=1, max_steps=len(batches), max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer] + ([counter] if counter else []), limit_val_batches=0, num_sanity_val_steps=0,
        log_every_n_steps=min(50, len(batches)),
    )
    loader = DataLoader(batches, batch_size=None, shuffle=False, pin_memory=args.accelerator == "cuda")
    trainer.fit(model, train_dataloaders=loader)
    return timer.seconds_per_step


def time_raw(args, k: int, aggregator_name: str | None, batches: list[MultiTaskBatch]) -> float:
    """A plain PyTorch loop: sum of the losses and one backward (``None``), or torchjd's Jacobian descent."""
    device = torch.device(args.accelerator)
    module = make_module(args, k, "equal" if aggregator_name is None else aggregator_name).to(device)
    arch, heads, tasks = module.architecture, module.tasks, module.task_names  # ours: HardSharing + task heads
    shared, head_params = arch.shared_parameters(), [list(heads[t].parameters()) for t in tasks]
    aggregator = None if aggregator_name is None else module.balancer.aggregator  # the very torchjd object ours uses
    opt = torch.optim.Adam([*arch.parameters(), *heads.parameters()], lr=1e-3)
    module.train()
    for i, batch in enumerate(batches):
        if i == args.warmup:
            sync(device)
            start = time.perf_counter()
        x = batch.x.to(device, non_blocking=True)
        z = arch.backbone(x)  # (B, D)
        losses = [F.cross_entropy(heads[t](z), batch.targets[t].to(device, non_blocking=True)) for t in tasks]
        if aggregator is None:
            torch.stack(losses).sum().backward()
        else:
            mtl_backward(losses, features=z, tasks_params=head_params, shared_params=shared)
            jac_to_grad(shared, aggregator)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return (time.perf_counter() - start) / (len(batches) - args.warmup)


def import_libmtl() -> tuple[types.ModuleType | None, str]:
    """``(LibMTL, version)``, or ``(None, why it cannot be imported)``."""
    shim = types.ModuleType("torchvision.models.utils")  # LibMTL/model/resnet.py imports it; torchvision dropped it
    shim.load_state_dict_from_url = torch.hub.load_state_dict_from_url
    sys.modules.setdefault("torchvision.models.utils", shim)
    try:
        import LibMTL
        import LibMTL.architecture
        import LibMTL.weighting
    except Exception as e:  # not installed, or an incompatible dependency at import: the peer is skipped, not us
        return None, f"{type(e).__name__}: {e}"
    return LibMTL, version("LibMTL")


def make_libmtl(args, lib: types.ModuleType, k: int, method: str, architecture: str, device: torch.device):
    """LibMTL's model for ``method`` on ``architecture``, assembled as its ``Trainer._prepare_model`` does."""
    arch_class = getattr(lib.architecture, LIBMTL_ARCHITECTURES[architecture])
    weighting_class = getattr(lib.weighting, LIBMTL_WEIGHTINGS[method])

    class MTLmodel(arch_class, weighting_class):
        def __init__(self, task_name, encoder_class, decoders, rep_grad, multi_input, device, kwargs):
            super().__init__(task_name, encoder_class, decoders, rep_grad, multi_input, device, **kwargs)
            self.init_param()

        def zero_grad_share_params(self):
            for p in self.get_share_params():  # in place: LibMTL writes into p.grad.data next (torch < 2 semantics)
                if p.grad is not None:
                    p.grad.zero_()

        def _grad2vec(self):
            # the flat (D,) CPU vector of the shared gradients, as theirs, but by reshape: their view(-1) fails on
            # the channels-last gradients of Conv-4
            return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
                              for p in self.get_share_params()]).cpu()

    tasks = [f"t{i}" for i in range(k)]
    arch_args = {HARD: {}, "MMoE": {"img_size": list(INPUT_SHAPE), "num_experts": [args.experts]},
                 "CGC": {"img_size": list(INPUT_SHAPE), "num_experts": [args.experts] + [args.task_experts] * k}}
    torch.manual_seed(0)
    decoders = nn.ModuleDict({t: nn.Sequential(nn.Flatten(), nn.Linear(args.hidden, args.classes)) for t in tasks})
    return MTLmodel(task_name=tasks, encoder_class=partial(make_backbone, args.backbone, args.hidden),
                    decoders=decoders, rep_grad=False, multi_input=False, device=device,
                    kwargs=arch_args[architecture]).to(device)


def time_libmtl(args, lib: types.ModuleType, k: int, method: str, architecture: str,
                batches: list[MultiTaskBatch]) -> float:
    """What LibMTL's ``Trainer.train`` runs per batch, minus its data iterator and metric meter."""
    device = torch.device(args.accelerator)
    model = make_libmtl(args, lib, k, method, architecture, device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for i, batch in enumerate(batches):
        if i == args.warmup:
            sync(device)
            start = time.perf_counter()
        x = batch.x.to(device, non_blocking=True)
        preds = model(x)
        losses = torch.zeros(k, device=device)  # as their _compute_loss fills it
        for tn, t in enumerate(model.task_name):
            losses[tn] = F.cross_entropy(preds[t], batch.targets[t].to(device, non_blocking=True))
        opt.zero_grad()
        model.backward(losses)
        opt.step()
    sync(device)
    return (time.perf_counter() - start) / (len(batches) - args.warmup)


# ---------------------------------------------------------------------- command line
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tasks", type=int, nargs="+", default=[4, 50], help="numbers of tasks K")
    parser.add_argument("--methods", nargs="+", default=list_balancers(), help="registered balancer names")
    parser.add_argument("--torchjd", nargs="*", default=["upgrad", "mgda"], help="aggregators also run via torchjd")
    parser.add_argument("--jacobians", nargs="+", default=["auto"], choices=["auto", "loop", "vmap"],
                        help="parameter-level Jacobian modes to time (MultiTaskModule's `jacobian`)")
    parser.add_argument("--architectures", nargs="*", default=list(list_architectures()),
                        help="architectures timed at `equal` against hard sharing (default: all)")
    parser.add_argument("--experts", type=int, default=3, help="shared experts (MMoE, CGC, PLE, DSelect-k)")
    parser.add_argument("--task-experts", type=int, default=1, help="experts per task (CGC, PLE)")
    parser.add_argument("--libmtl", nargs="*", default=list(LIBMTL_WEIGHTINGS), choices=list(LIBMTL_WEIGHTINGS),
                        help="methods also run through LibMTL 1.1.5 (skipped if it cannot be imported)")
    parser.add_argument("--backbone", default="mlp", choices=["mlp", "conv4"], help="MLP 784-h-h-h or Conv-4 (h ch)")
    parser.add_argument("--hidden", type=int, default=512, help="MLP width / Conv-4 channels")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10, help="classes per task")
    parser.add_argument("--steps", type=int, default=30, help="steps per timed run (warm-up included)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); 1 avoids OpenMP spinning "
                        "when other jobs share the cores")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    for name in args.methods + args.torchjd:
        balancer_class(name)  # an unknown name raises, listing the valid ones
    torchjd_names = [n for n in list_balancers("aggregator") if issubclass(balancer_class(n), TorchJDAggregator)]
    if any(name not in torchjd_names for name in args.torchjd):
        parser.error(f"--torchjd takes torchjd-backed aggregators: {', '.join(torchjd_names)}")
    unknown = [a for a in args.architectures if a not in list_architectures()]
    if unknown:
        parser.error(f"unknown --architectures {unknown}; choose from {', '.join(list_architectures())}")
    if args.experts < 2 or args.task_experts < 0:
        parser.error(f"--experts must be >= 2 (DSelect-k selects among them) and --task-experts >= 0, got "
                     f"{args.experts} and {args.task_experts}")
    if args.steps <= args.warmup:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    return args


def level_of(method: str) -> str:
    return "parameter" if issubclass(balancer_class(method), GradientAggregator) else "-"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    for noise in (".*does not have many workers.*", ".*no `val_dataloader`.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=noise)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.accelerator)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    lib, lib_version = import_libmtl() if args.libmtl else (None, "not asked (--libmtl)")
    print(f"device: {device_name}; torch {torch.__version__}; lightning {L.__version__}; torchjd {version('torchjd')}; "
          f"LibMTL {lib_version if lib else 'skipped: ' + lib_version}")
    print(f"backbone {args.backbone} (hidden {args.hidden}), batch {args.batch_size}, {args.classes} classes/task, "
          f"{args.steps - args.warmup} timed steps after {args.warmup}, median of {args.repeats}")
    signatures = copy_signatures(make_backbone(args.backbone, args.hidden))
    results = {"record": provenance(argv=None if argv is None else [__file__, *argv], accelerator=args.accelerator),
               "device": device_name, "settings": vars(args), "runs": [], "skipped": [],
               "libmtl": {"available": lib is not None, "version": lib_version if lib else None,
                          "reason": None if lib else lib_version}}

    # runs are (loop, method, level, architecture); loop "ours" (Lightning + MultiTaskModule), or a plain loop:
    # "torch", "torchjd", "libmtl"
    ours = list(dict.fromkeys(["equal", *args.methods, *args.torchjd]))
    param_levels = ["parameter" if j == "auto" else f"parameter:{j}" for j in args.jacobians]
    base_runs = [("ours", m, lvl, HARD) for m in ours for lvl in (
        (*param_levels, "representation") if issubclass(balancer_class(m), GradientAggregator) else ("-",))]
    base_runs += [("torch", "equal", "-", HARD)] + [("torchjd", m, "mtl_backward", HARD) for m in args.torchjd]
    for k in args.tasks:
        runs, skipped = list(base_runs), []
        for name in dict.fromkeys([HARD, *args.architectures]):
            try:  # constructor checks first: e.g. MTAN needs (C, H, W) stage outputs, cross-stitch two tasks
                make_architecture(args, name)([f"t{i}" for i in range(k)])
            except (ValueError, TypeError) as e:
                skipped.append({"architecture": name, "tasks": k, "reason": str(e)})
                continue
            runs.append(("ours", "equal", "-", name))
        built = {r[3] for r in runs}
        lib_archs = [a for a in LIBMTL_ARCHITECTURES if a in built and (a == HARD or a in args.architectures)]
        for m in args.libmtl if lib else []:
            runs += [(loop, m, level_of(m), a) for a in lib_archs for loop in ("ours", "libmtl")]
        runs = list(dict.fromkeys(runs))
        results["skipped"] += skipped
        batches = make_batches(args, k)
        times: dict[tuple[str, str, str, str], list[float]] = {run: [] for run in runs}
        counters: dict[str, SharedForwards] = {}
        for r in range(args.repeats):  # alternate the order, so that drift favours no run
            for run in runs if r % 2 == 0 else runs[::-1]:
                loop, method, level, arch = run
                if loop == "ours":
                    counter = None
                    if method == "equal" and r == 0:
                        counter = counters[arch] = SharedForwards(max(args.warmup - 1, 0), signatures)
                    t = time_lightning(args, k, method, level if level != "-" else "parameter", batches, arch, counter)
                elif loop == "libmtl":
                    t = time_libmtl(args, lib, k, method, arch, batches)
                else:
                    t = time_raw(args, k, method if loop == "torchjd" else None, batches)
                times[run].append(t)
        report(k, runs, times, counters, skipped, results)
    results["tables"], results["headline"] = tables(results), headline(results)
    if args.json:
        write_json(args.json, results)
    return results


def headline(results: dict) -> list[list[str]]:
    """For the README, per K: our step against torchjd's for each aggregator (parameter level: the same Jacobian)
    and against LibMTL's bare loop for each method and architecture."""
    rows, lines = results["runs"], []
    for k in dict.fromkeys(r["tasks"] for r in rows):
        jd = [r for r in rows if r["tasks"] == k and r["ratio_vs_torchjd"] and r["level"] == "parameter"]
        if jd:
            lines.append([f"aggregators on hard sharing, K = {k}: step against torchjd's",
                          ", ".join(f"{r['method']} {r['ratio_vs_torchjd']:.2f}×" for r in jd)])
        lib = [r for r in rows if r["tasks"] == k and r["ratio_vs_libmtl"]]
        if lib:
            lines.append([f"K = {k}: step against LibMTL's", ", ".join(
                f"{LIBMTL_WEIGHTINGS[r['method']]} on {LIBMTL_ARCHITECTURES[r['architecture']]} "
                f"{r['ratio_vs_libmtl']:.2f}×" for r in lib)])
    return lines


def tables(results: dict) -> list[dict]:
    """The rows of every K as the tables ``recipes/report.py`` renders (``docs/benchmarks.md``)."""
    settings, rows = results["settings"], results["runs"]
    where = (f"{settings['backbone']} backbone (hidden {settings['hidden']}), batch {settings['batch_size']}, "
             f"{settings['classes']} classes per task, median of {settings['repeats']} alternating repeats of "
             f"{settings['steps'] - settings['warmup']} timed steps; {results['device']}")
    methods = [[r["method"] if r["loop"] == "ours" else f"{r['loop']}:{r['method']}", r["level"], r["tasks"],
                r["ms_per_step"], r["ratio_vs_equal"], r["ratio_vs_torchjd"]]
               for r in rows if r["architecture"] == HARD and r["loop"] != "libmtl"]
    found = [table("Balancing methods on hard sharing: step time", ["method", "level", "K", "ms/step", "vs equal",
                                                                     "ours / torchjd"], methods, note=where)]
    archs = []
    for r in rows:
        if r["shared_forwards_per_step"] is not None:
            counts = list(r["shared_forwards_per_step"].values())
            low, high = (min(counts), max(counts)) if counts else (0, 0)
            archs.append([r["architecture"], r["tasks"], r["ms_per_step"], r["ratio_vs_hard"],
                          f"{low}{'' if low == high else f'-{high}'} ({len(counts)})"])
    archs += [[s["architecture"], s["tasks"], None, None, f"skipped: {s['reason']}"] for s in results["skipped"]]
    if archs:
        found.append(table("Architectures at equal weighting: step time", ["architecture", "K", "ms/step", "vs hard",
                                                                           "forwards per step (copies)"], archs,
                           note="Forwards per step: how often each copy of the backbone (or of its stages, experts,"
                                " columns) ran in one step; each must run once."))
    lib = {(r["method"], r["level"], r["architecture"], r["tasks"]): r for r in rows if r["loop"] == "libmtl"}
    pairs = [[f"{r['method']}/{LIBMTL_WEIGHTINGS[r['method']]}",
              f"{r['architecture']}/{LIBMTL_ARCHITECTURES[r['architecture']]}", r["tasks"], r["ms_per_step"],
              lib[(r["method"], r["level"], r["architecture"], r["tasks"])]["ms_per_step"], r["ratio_vs_libmtl"]]
             for r in rows if r["loop"] == "ours" and r["ratio_vs_libmtl"]]
    if pairs:
        found.append(table(f"Against LibMTL {results['libmtl']['version']} (its bare per-step loop)",
                           ["method", "architecture", "K", "ours ms", "LibMTL ms", "ours / LibMTL"], pairs))
    return found


def report(k: int, runs: list[tuple], times: dict, counters: dict, skipped: list[dict], results: dict) -> None:
    """Print the three tables of one K (methods, architectures, LibMTL) and add its rows to ``results``."""
    ms = {run: 1e3 * statistics.median(ts) for run, ts in times.items()}
    equal_ms = ms[("ours", "equal", "-", HARD)]
    rows = {}
    for run in runs:
        loop, method, level, arch = run
        t = ms[run]
        jd = ms.get(("torchjd", method, "mtl_backward", HARD)) if loop == "ours" and arch == HARD else None
        lib = ms.get(("libmtl", method, level, arch)) if loop == "ours" else None
        counts = counters[arch].counter.counts if loop == "ours" and method == "equal" and arch in counters else None
        rows[run] = {"loop": loop, "method": method, "level": level, "architecture": arch, "tasks": k,
                     "ms_per_step": t, "ratio_vs_equal": t / equal_ms, "ratio_vs_torchjd": t / jd if jd else None,
                     "ratio_vs_hard": t / equal_ms if loop == "ours" and method == "equal" else None,
                     "ratio_vs_libmtl": t / lib if lib else None, "shared_forwards_per_step": counts,
                     "repeats_ms": [1e3 * v for v in times[run]]}
    results["runs"] += rows.values()

    print(f"{'method':>20s} {'level':>14s} {'K':>4s} {'ms/step':>9s} {'vs equal':>9s} {'ours/torchjd':>12s}")
    for row in rows.values():
        if row["architecture"] == HARD and row["loop"] != "libmtl":
            name = row["method"] if row["loop"] == "ours" else f"{row['loop']}:{row['method']}"
            vs_jd = f"{row['ratio_vs_torchjd']:12.3f}" if row["ratio_vs_torchjd"] else f"{'-':>12s}"
            print(f"{name:>20s} {row['level']:>14s} {k:4d} {row['ms_per_step']:9.2f} {row['ratio_vs_equal']:9.3f} "
                  f"{vs_jd}")
    print(f"{'architecture (equal)':>20s} {'K':>4s} {'ms/step':>9s} {'vs hard':>9s} {'fwd/step (copies)':>18s}")
    for row in rows.values():
        if row["shared_forwards_per_step"] is not None:
            counts = list(row["shared_forwards_per_step"].values())
            low, high = (min(counts), max(counts)) if counts else (0, 0)
            fwd = f"{low}{'' if low == high else f'-{high}'} ({len(counts)})"
            print(f"{row['architecture']:>20s} {k:4d} {row['ms_per_step']:9.2f} {row['ratio_vs_hard']:9.3f} "
                  f"{fwd:>18s}")
    for s in skipped:
        print(f"{s['architecture']:>20s} {k:4d}   skipped: {s['reason']}")
    pairs = [(row, rows[("libmtl", *run[1:])]) for run, row in rows.items() if row["ratio_vs_libmtl"]]
    if pairs:
        print(f"{'method':>20s} {'architecture':>14s} {'K':>4s} {'ours ms':>9s} {'libmtl ms':>9s} {'ours/libmtl':>12s}")
        for ours, theirs in pairs:
            name = f"{ours['method']}/{LIBMTL_WEIGHTINGS[ours['method']]}"
            arch = f"{ours['architecture']}/{LIBMTL_ARCHITECTURES[ours['architecture']]}"
            print(f"{name:>20s} {arch:>14s} {k:4d} {ours['ms_per_step']:9.2f} {theirs['ms_per_step']:9.2f} "
                  f"{ours['ratio_vs_libmtl']:12.3f}")


if __name__ == "__main__":
    main()
