"""The LightningCLI base shared by the recipes: checkpointing, W&B by default, ``--ckpt_path best|last``, exact
resumption (``fit --ckpt_path last``)."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path

import torch
from jsonargparse import DefaultHelpFormatter
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback, _get_module_type
from lightning.pytorch.cli import _InstantiatorFn as _LightningInstantiator
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_mtl.callbacks import NonFiniteGuard
from lightning_mtl.checkpointing import AtomicCheckpointIO, RecipeCheckpoint, RNGStates
from lightning_mtl.history import MetricsHistory
from lightning_mtl.progress import IntervalBar, LineProgress
from lightning_mtl.records import provenance


def resolve_checkpoint_alias(ckpt_path: str | None, dirpath: str | None) -> str | None:
    """Map ``--ckpt_path best|last`` onto the files that ``fit`` left in ``dirpath`` (``checkpoint.dirpath``).

    Lightning resolves ``best``/``last`` only inside the process that ran ``fit``; this makes them work in a fresh
    ``test``/``validate`` process too. ``best`` is read from the ModelCheckpoint state stored in ``last.ckpt``.
    Any other value is returned unchanged, after checking that a local path exists (Lightning would find out only
    after preparing the data).

    Raises:
        ValueError: ``dirpath`` is not set.
        FileNotFoundError: ``last.ckpt``, the best checkpoint it names, or the local file ``ckpt_path`` does not exist.

    Warns:
        UserWarning: ``best`` for a fit that never validated (no best checkpoint): ``last.ckpt`` is used.
    """
    if ckpt_path not in ("best", "last"):
        text = str(ckpt_path or "")  # "hpc", "registry[:...]" and URLs are Lightning's to resolve
        local = text not in ("", "hpc") and not text.lower().startswith("registry") and "://" not in text
        if local and not Path(text).exists():  # a folder is a sharded (FSDP, DeepSpeed) checkpoint
            raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint; pass an existing .ckpt file, "
                                    f"or best / last to take them from checkpoint.dirpath after `fit`.")
        return ckpt_path
    if dirpath is None:
        raise ValueError(f"--ckpt_path {ckpt_path} needs checkpoint.dirpath in the config to find the checkpoints.")
    last = Path(dirpath) / "last.ckpt"
    if not last.exists():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no {last}; run `fit` with this config first.")
    if ckpt_path == "last":
        return str(last)
    state = torch.load(last, map_location="cpu", weights_only=True)["callbacks"]
    best = next((s["best_model_path"] for k, s in state.items() if k.startswith(("RecipeCheckpoint",
                                                                                   "ModelCheckpoint"))), "")
    if not best:  # the fit that wrote last.ckpt never validated: there is no best, and last is all there is
        rank_zero_warn(f"--ckpt_path best: the fit that wrote {last} never validated (a run shorter than "
                       f"trainer.val_check_interval, or without validation), so it kept no best checkpoint; using "
                       f"last.ckpt. Validate during fit to select a best checkpoint.")
        return str(last)
    if not Path(best).exists():
        raise FileNotFoundError(f"--ckpt_path best: {last} names no existing best checkpoint ({best!r}); pass "
                                f"--ckpt_path last or a checkpoint file, or run `fit` again.")
    rank_zero_info(f"best checkpoint: {best}")
    return best


#: the model's arguments whose class (or registered name) tells one run from another, besides the model's own class.
IDENTITY_KEYS = ("architecture", "backbone", "expert", "balancer", "meta_balancer")


def model_identity(model: object) -> list[str]:
    """The short class names that make a run of ``model`` (a ``class_path`` / ``init_args`` mapping, as in a config
    file or in the parsed configuration): the model's class, then those of its :data:`IDENTITY_KEYS` arguments
    (a balancer given by registered name counts by that name)."""
    if not isinstance(model, dict) or "class_path" not in model:
        return []
    names = [str(model["class_path"]).rsplit(".", 1)[-1]]
    args = model.get("init_args") or {}
    for key in IDENTITY_KEYS:
        value = args.get(key) if isinstance(args, dict) else None
        if isinstance(value, dict) and "class_path" in value:
            names.append(str(value["class_path"]).rsplit(".", 1)[-1])
        elif isinstance(value, str):
            names.append(value)
    return names


def config_file_section(files: list, key: str) -> object:
    """The ``key`` section (``"model"``, ``"checkpoint"``) of the last of the ``--config`` files that has one."""
    import yaml

    section = None
    for file in files or []:
        text = file.get_content() if hasattr(file, "get_content") else Path(str(file)).read_text()
        data = yaml.safe_load(text) or {}
        if isinstance(data, dict) and data.get(key) is not None:
            section = data[key]
    return section


def run_dirpath(dirpath: str | None, files: list, model: dict) -> tuple[str, str | None]:
    """The checkpoint folder of a run: ``(dirpath, why)``, ``why`` saying why it is not the configured one.

    A config names its run's folder (``checkpoint.dirpath: runs/<dataset>/<config>/checkpoints``). A run whose model
    differs from the config file's (``--model MAML`` on a ProtoNet config, ``--model.architecture MTAN`` on a
    hard-sharing one) goes to a sibling named by what differs (``runs/<dataset>/<config>-MAML/checkpoints``), so runs
    of different models never share ``last.ckpt`` and ``--ckpt_path best|last`` of the same command line find that
    run's own files. A ``checkpoint.dirpath`` given on the command line is used as it is. Without one the folder is
    ``runs/<config file stem>-<model class>/checkpoints`` (``runs/<model class>/checkpoints`` without a config file).
    """
    final = model_identity(model)
    if dirpath is None:
        stem = Path(str(files[-1])).stem if files else None
        name = f"{stem}-{final[0]}" if stem and final else (stem or (final[0] if final else "run"))
        return str(Path("runs") / name / "checkpoints"), "checkpoint.dirpath is not set"
    checkpoint = config_file_section(files, "checkpoint")
    if not isinstance(checkpoint, dict) or checkpoint.get("dirpath") != dirpath:
        return dirpath, None  # chosen on the command line (or not by a config file): the user's folder
    given = model_identity(config_file_section(files, "model"))
    if not given or given == final:
        return dirpath, None
    changed = [name for i, name in enumerate(final) if i >= len(given) or given[i] != name] or final[:1]
    suffix = "-".join(changed)
    path = Path(dirpath)
    folder = path.parent.with_name(f"{path.parent.name}-{suffix}") / path.name if path.name == "checkpoints" \
        else path.with_name(f"{path.name}-{suffix}")
    return str(folder), f"the model ({', '.join(final)}) differs from the config file's ({', '.join(given)})"


class RunConfig(SaveConfigCallback):
    """Writes the resolved configuration of a ``fit`` as ``config.yaml`` into its checkpoint folder, beside the
    checkpoints it produced (Lightning's callback writes it into the logger's folder, or into the working folder
    without a logger, where runs overwrite each other's). ``validate`` and ``test`` leave a fit's file alone; a
    ``test`` whose folder has none (a test-only run, e.g. of a pre-trained embedding) writes its own, so that its
    ``test_metrics.json`` still says what was tested."""

    def __init__(self, parser, config, **kwargs) -> None:
        super().__init__(parser, config, **{**kwargs, "save_to_log_dir": False})

    def setup(self, trainer: Trainer, pl_module, stage: str) -> None:
        """Nothing yet: written at the start of the fit, after the checkpoint callback looked at its folder."""

    def on_fit_start(self, trainer: Trainer, pl_module) -> None:
        if trainer.is_global_zero and not self.already_saved:
            self.save_config(trainer, pl_module, "fit")
            self.already_saved = True

    def on_test_start(self, trainer: Trainer, pl_module) -> None:
        dirpath = self.config.get("checkpoint.dirpath")
        if trainer.is_global_zero and dirpath is not None and not (Path(dirpath) / self.config_filename).exists():
            self.save_config(trainer, pl_module, "test")

    def save_config(self, trainer: Trainer, pl_module, stage: str) -> None:  # rank 0 only
        dirpath = self.config.get("checkpoint.dirpath")
        if dirpath is None:
            return
        Path(dirpath).mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, str(Path(dirpath) / self.config_filename), skip_none=False, overwrite=True,
                         multifile=False)


def _import(class_path: str):
    """The class named by ``class_path`` (``module.Class``)."""
    import importlib

    module, _, name = str(class_path).rpartition(".")
    return getattr(importlib.import_module(module), name)


def _default(cls: type, name: str):
    """The default of ``cls.__init__``'s argument ``name`` (``None`` without one)."""
    parameter = inspect.signature(cls.__init__).parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def end_distributed() -> None:
    """Destroy the default process group, if one is initialised: the end of a run that succeeded.

    PyTorch asks every process to do this before it exits. Otherwise gloo's worker threads can outlive the Python
    interpreter and abort the process (SIGABRT, "terminate called without an active exception") after training has
    finished (pytorch/pytorch#190489). Call it only after success: a rank that fails mid-collective must not wait in
    this call for the others.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value",
          "Expected a <class 'NoneType'>", "Expected a <class 'str'>", "Problem with given class_path")


def condense_parser_error(message: str) -> str:
    """jsonargparse's nested union report reduced to its leaves, each with the option's dotted key, e.g.
    ``model.balancer.c: Expected a <class 'float'>. Got value: abc.`` (the full report: ``JSONARGPARSE_DEBUG=1``)."""
    stack: list[tuple[int, str]] = []
    out: list[str] = []
    for line in message.splitlines():
        text = line.strip()
        if not text:  # a blank line is no step out of the nesting
            continue
        indent = len(line) - len(line.lstrip(" -"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        for key in re.findall(r'Parser key "([^"]+)":', text):
            stack.append((indent, key))
        text = re.sub(r'^.*Parser key "[^"]+":', "", text).strip().lstrip("- ").strip()
        if not text or text.startswith(_NOISE) or text.endswith("expects a function or a callable class:"):
            continue
        text = re.sub(r"(\. Got value: [^.]*)\. Got value: Namespace\(.*$", r"\1.", text)
        key = ".".join(k for _, k in stack if k not in ("init_args",))
        out.append(f"{key}: {text}" if key and not text.startswith(key) else text)
    return "\n".join(dict.fromkeys(out)) or message


def _not_a_choice(class_path: str) -> bool:
    """Whether ``class_path`` is left out of the listed choices: a class of an installed third-party or
    standard-library module (torch, torchvision, timm, ...), a model or a metric (modules, but never a backbone), or
    a building block of ours that its package does not export (``lightning_mtl.nn.conv4.BatchNorm2d``)."""
    import sysconfig

    import lightning as L
    from torchmetrics import Metric

    module = sys.modules.get(class_path.rsplit(".", 1)[0])
    cls = getattr(module, class_path.rsplit(".", 1)[-1], None)
    if isinstance(cls, type) and issubclass(cls, (L.LightningModule, Metric)):
        return True
    if class_path.startswith("lightning_mtl."):  # exported: named in a package (lightning_mtl.nn.Conv4)
        return not str(getattr(module, "__file__", "")).endswith("__init__.py")
    file = getattr(module, "__file__", None)
    if file is None:
        return True
    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib", "platstdlib")}
    return any(os.path.abspath(file).startswith(os.path.abspath(root) + os.sep) for root in roots)


def known_subclasses_of_ours(help_text: str) -> str:
    """A help string's "known subclasses" (every imported subclass of, e.g., ``torch.nn.Module``: hundreds of
    ``torch.nn`` and torchvision classes, our models and metrics) cut to the choices: lightning_mtl's exported classes
    and the user's own (:func:`_not_a_choice`); any other class is still accepted by its class path."""
    head, sep, tail = help_text.partition(", known subclasses: ")
    if not sep:
        return help_text
    listed, close = (tail[:-1], ")") if tail.endswith(")") else (tail, "")
    ours = [path for path in listed.split(", ") if not _not_a_choice(path)]
    return (f"{head}, known subclasses: {', '.join(ours)}; or any other by its class path{close}" if ours
            else f"{head}; any subclass by its class path{close}")


#: the model class the running recipe accepts subclasses of (set by :class:`RecipeCLI`): the valid ``--model`` names.
MODEL_BASE: list[type] = [torch.nn.Module]


def class_choices(key: str) -> list[str]:
    """The names a recipe accepts for the class option ``key`` (``model.architecture``, ``model.backbone``, ``model``,
    ``data``, ...): ours by short name; empty where there is no fixed list."""
    import lightning as L

    last = key.rsplit(".", 1)[-1]

    def exported(package, base) -> list[str]:
        return sorted(n for n in package.__all__ if isinstance(getattr(package, n), type)
                      and issubclass(getattr(package, n), base) and not inspect.isabstract(getattr(package, n)))

    if last == "architecture":
        from lightning_mtl.mtl.architectures import list_architectures

        return list(list_architectures())
    if last in ("backbone", "expert", "embedding"):
        import lightning_mtl.nn as nn_

        return exported(nn_, torch.nn.Module)
    if last == "model":
        import lightning_mtl.meta as meta
        import lightning_mtl.mtl as mtl

        bases = ("EpisodicModule", "GradientLearner")  # what a method subclasses, not a method
        return [n for n in exported(meta, MODEL_BASE[0]) + exported(mtl, MODEL_BASE[0]) if n not in bases]
    if last == "data":
        import lightning_mtl.datamodules as data

        return [n for n in exported(data, L.LightningDataModule) if n != "MultiTaskDataModule"]
    return []


def explain_unknown_classes(text: str) -> str:
    """jsonargparse's two lines for a class name it cannot import ("Expected a path but X either not accessible or
    invalid", "Expected a dot import path string: X") as one that names the option, the closest valid name and the
    valid names; a missing attribute of a module (``lightning_mtl.nn.Conv5``) gets the same list."""
    import difflib

    out, seen = [], set()
    for line in text.splitlines():
        unknown = (re.match(r"(?:(?P<key>[\w.]+): )?Expected a path but (?P<name>\S+) either not accessible", line)
                   or re.match(r"(?:(?P<key>[\w.]+): )?Expected a dot import path string: (?P<name>[\w.]+)", line))
        missing = re.match(r"(?P<key>[\w.]+): module '[\w.]+' has no attribute '(?P<name>\w+)'", line)
        match = unknown or missing
        key = match.group("key") if match else None
        if match is None or key is None or key.endswith("balancer"):
            out.append(line)
            continue
        name = match.group("name").rstrip(".")
        choices = class_choices(key)
        close = difflib.get_close_matches(name.rsplit(".", 1)[-1], choices, n=1, cutoff=0.6)
        hint = (f"did you mean {close[0]}? " if close else "") + (
            f"valid names: {', '.join(choices)} (or the full class path of your own, e.g. my_module.MyClass)"
            if choices else "give the full class path (module.Class) of an importable class")
        if missing:
            out.extend([line, f"{key}: {hint}"])
        elif (key, name) not in seen:
            seen.add((key, name))
            out.append(f"{key}: no class named '{name}'; {hint}")
    return "\n".join(out)


def _takes_episode_settings(class_path: str) -> bool:
    """Whether the class named ``class_path`` takes an ``episodes`` argument of :class:`EpisodeSettings` (the
    built-in episodic datamodules, a user's own :class:`~lightning_mtl.datamodules.EpisodicImages`)."""
    try:
        cls = _import(class_path)
    except (ImportError, AttributeError, ValueError):
        return False
    from lightning_mtl.datamodules import EpisodicImages

    return isinstance(cls, type) and issubclass(cls, EpisodicImages) and "episodes" in inspect.signature(
        cls.__init__).parameters


def explain_moved_episode_settings(message: str, text: str) -> str:
    """jsonargparse's "Option 'train_ways' is not accepted" for a setting of
    :class:`~lightning_mtl.datamodules.EpisodeSettings` given flat to an episodic datamodule (an old config, or
    ``--data.train_ways``) as one line saying where it moved: under ``episodes``.

    Args:
        message: jsonargparse's full report, which names the class (``Problem with given class_path '...'``) of
            each option it refused.
        text: the condensed report (:func:`condense_parser_error`), whose lines are rewritten.
    """
    from dataclasses import fields

    from lightning_mtl.datamodules import EpisodeSettings

    names = [f.name for f in fields(EpisodeSettings)]
    owner: dict[str, str] = {}  # refused option -> class path that refused it
    stack: list[tuple[int, str]] = []
    for line in message.splitlines():
        indent = len(line) - len(line.lstrip(" -"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if given := re.search(r"Problem with given class_path '([\w.]+)'", line):
            stack.append((indent, given.group(1)))
        elif (refused := re.search(r"Option '(\w+)' is not accepted", line)) and stack:
            owner.setdefault(refused.group(1), stack[-1][1])
    out = []
    for line in text.splitlines():
        match = re.fullmatch(r"(?P<key>[\w.]+): Option '(?P<name>\w+)' is not accepted", line.strip())
        name = match.group("name") if match else None
        if name not in names or not _takes_episode_settings(owner.get(name, "")):
            out.append(line)
            continue
        key, cls = match.group("key"), owner[name].rsplit(".", 1)[-1]
        flag = "" if "." in key else f", or write --{key}.episodes.{name} on the command line"
        out.append(f"{key}.init_args.{name} moved to {key}.init_args.episodes.{name}: {cls} takes its episode "
                   f"settings ({', '.join(names)}) as one group, EpisodeSettings; move them under `episodes:` in "
                   f"the YAML{flag}.")
    return "\n".join(out)


class RecipeHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with our and the user's classes as the known choices, not all of ``torch.nn``."""

    def _get_help_string(self, action) -> str:
        return known_subclasses_of_ours(super()._get_help_string(action))


class RecipeParser(LightningArgumentParser):
    """Parse errors in a few lines: the option's key and what is wrong, not the whole usage and union report; help
    with :class:`RecipeHelpFormatter` (also for ``--model.help CLASS``, whose parser is built from this class)."""

    def __init__(self, *args, formatter_class=RecipeHelpFormatter, **kwargs) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        text = condense_parser_error(message)
        named = re.search(r"balancer: Expected a dot import path string: (\w+)", text)
        if named:
            from lightning_mtl.mtl.balancing import balancer_class, list_balancers

            if named.group(1) in list_balancers():
                cls = balancer_class(named.group(1))
                text += (f"\n'{named.group(1)}' is a registered name and takes no arguments; to give arguments, name "
                         f"its class: --model.balancer {cls.__name__} (or class_path {cls.__module__}.{cls.__name__}"
                         f" in YAML) with --model.balancer.init_args.<name> <value>")
        text = explain_unknown_classes(explain_moved_episode_settings(message, text))
        sys.stderr.write(f"error: {text}\n(`{prog} --help` lists the options; "
                         f"`--model.help CLASS` or `--data.help CLASS` the arguments of a class)\n")
        sys.exit(2)


def one_line(obj: object, width: int = 88) -> str:
    """The first sentence of ``obj``'s docstring, cut to ``width`` characters."""
    doc = " ".join((inspect.getdoc(obj) or "").split("\n\n")[0].split())
    sentence = re.split(r"(?<!e\.g)(?<!i\.e)(?<=[a-z0-9)])\. ", doc)[0].rstrip(".")
    return sentence if len(sentence) <= width else sentence[: width - 3].rstrip() + "..."


def catalogue_text(sections: dict[str, dict[str, object]]) -> str:
    """``sections`` (title → {name: class}) as the help's catalogue: one line per name."""
    width = max((len(name) for entries in sections.values() for name in entries), default=0) + 2
    blocks = []
    for title, entries in sections.items():
        lines = [f"  {name:<{width}}{one_line(obj)}" for name, obj in entries.items()]
        blocks.append(f"{title}:\n" + "\n".join(lines))
    return "\n\n".join(blocks)


class _CatalogueFormatter(argparse.RawDescriptionHelpFormatter, RecipeHelpFormatter):
    """Keeps the catalogue's lines as written."""


def run(main) -> None:
    """Run a recipe's ``main``: an error of the configuration (see :meth:`RecipeCLI.instantiate_classes`) is printed
    as one ``error:`` message, without traceback (``LIGHTNING_MTL_TRACEBACK=1`` shows it)."""
    try:
        main()
    except (ValueError, TypeError, FileNotFoundError) as e:
        if not getattr(e, "configuration_error", False) or os.environ.get("LIGHTNING_MTL_TRACEBACK"):
            raise
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_lightning() -> None:
    """Silence, narrowly, the notices Lightning prints on every recipe run that no user can act on:

    * "You have overridden `transfer_batch_to_device` (or `on_before_batch_transfer`) in `LightningModule` but have
      passed in a `LightningDataModule`": the episodic modules move an ``Episode``'s tensors themselves (one call per
      tensor, no generic traversal) and the multi-task module checks its batches before the transfer, on purpose;
      the notice states exactly what is meant to happen.
    * "Your `IterableDataset` has `__len__` defined ...": our training streams give every worker its own meta-batches
      (``EpisodeStream`` shards by worker), so their length is exact with any number of workers; Lightning warns
      whenever an iterable dataset has a length, even with 0 workers.
    * Lightning's advertisement for another product ("💡 Tip: ... litlogger"), an info log on every fit.
    * Deprecation notices raised inside Lightning and jsonargparse by their own calls (``LeafSpec`` from torch's
      pytree, ``skip_none``), which only their next releases can fix.
    """
    for message in (r"You have overridden `(transfer_batch_to_device|on_before_batch_transfer)` in `LightningModule` "
                    r"but have passed in a `LightningDataModule`",
                    r"Your `IterableDataset` has `__len__` defined",
                    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                    r"\s*skip_none parameter was deprecated"):
        warnings.filterwarnings("ignore", message=message)
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where rank_zero_info writes
    if not any(isinstance(f, _DropTips) for f in rank_zero_log.filters):
        rank_zero_log.addFilter(_DropTips())


class _TopLevelInstantiator(_LightningInstantiator):
    """Lightning's instantiator gives every module it builds under ``model`` / ``data`` the configuration of that key
    as its hyper-parameters, nested ones included: a datamodule inside a datamodule (``MultiDomainEpisodes``'
    domains) would receive its parent's arguments as ``hparams``. Only the class the key names gets them here; a
    nested one saves its own arguments, as in plain Python."""

    def __call__(self, class_type, *args, applied_instantiation_links: dict, **kwargs):
        named = (self.cli.config_dump.get(self.key) or {}).get("class_path") if hasattr(self.cli, "config_dump") \
            else None
        if named is not None and named != f"{class_type.__module__}.{class_type.__qualname__}" \
                and str(named).rsplit(".", 1)[-1] != class_type.__qualname__:
            return class_type(*args, **kwargs)
        return super().__call__(class_type, *args, applied_instantiation_links=applied_instantiation_links, **kwargs)


class RecipeCLI(LightningCLI):
    """LightningCLI with a ``checkpoint`` group (best by :attr:`monitor` and last), the W&B logger of
    :mod:`lightning_mtl.loggers` by default, and ``--ckpt_path best|last`` for ``test``/``validate`` in a fresh
    process. Recipes subclass it and set :attr:`monitor`.

    Resumption is exact: ``fit --ckpt_path last`` continues a killed run from its ``last.ckpt`` (refreshed every
    ``--checkpoint.every_n_train_steps``) to the weights and logged metrics of an uninterrupted run; the trainer saves
    the random states of every rank (:class:`~lightning_mtl.checkpointing.RNGStates`), writes checkpoints atomically
    and loads them with ``weights_only=True`` (:class:`~lightning_mtl.checkpointing.AtomicCheckpointIO`; pass
    ``--weights_only false`` only for a trusted checkpoint that pickles other objects).

    Classes of the user's own modules in the current folder are found without ``PYTHONPATH``.

    When standard output is not a terminal (a log file, a batch job), progress is printed as plain lines
    (:class:`~lightning_mtl.progress.LineProgress`, one every ``trainer.log_every_n_steps`` steps and one per
    validation) instead of Lightning's redrawn bar; ``--trainer.enable_progress_bar false`` silences both.
    """

    #: metric that selects the best checkpoint (maximised).
    monitor: str = "val/acc"

    def __init__(self, *args, **kwargs) -> None:
        quiet_lightning()
        # `python recipes/x.py` puts recipes/ on sys.path, not the folder it runs in: a user's own module there
        # (`class_path: my_module.MyArchitecture`) is found without PYTHONPATH, as with `python -m`
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        kwargs.setdefault("parser_class", RecipeParser)
        kwargs.setdefault("save_config_callback", RunConfig)
        MODEL_BASE[0] = kwargs.get("model_class") or (args[0] if args else torch.nn.Module)
        sections = self.catalogue()
        if sections:  # `recipe.py --help` lists what exists, one line each
            parser_kwargs = dict(kwargs.get("parser_kwargs") or {})
            recipe = sys.modules.get(type(self).__module__) or type(self)  # the recipe script's docstring
            parser_kwargs.setdefault("description", f"{one_line(recipe).rstrip('.')}.\n\n"
                                     f"{catalogue_text(sections)}\n\nPer class: `fit --model.help CLASS`, "
                                     f"`fit --data.help CLASS`.")
            parser_kwargs.setdefault("formatter_class", _CatalogueFormatter)
            kwargs["parser_kwargs"] = parser_kwargs
        super().__init__(*args, **kwargs)

    def catalogue(self) -> dict[str, dict[str, object]]:
        """What ``--help`` lists: section title → {name: class or module}. Recipes override it."""
        return {}

    def _add_instantiators(self) -> None:
        for key, cls, subclasses in (("model", self._model_class, self.subclass_mode_model),
                                     ("data", self._datamodule_class, self.subclass_mode_data)):
            self.parser.add_instantiator(_TopLevelInstantiator(cli=self, key=key), _get_module_type(cls),
                                         subclasses=subclasses)

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; a failure caused by a bad setting (a ``ValueError`` / ``TypeError`` /
        ``FileNotFoundError`` raised by a constructor, which jsonargparse wraps in reports on every union member) is
        re-raised alone, marked ``configuration_error`` (:func:`run` prints its message without traceback)."""
        try:
            super().instantiate_classes()
        except Exception as e:  # noqa: BLE001 - re-raised, either as it is or as its root cause
            root = e
            while root.__cause__ is not None:
                root = root.__cause__
            if not isinstance(root, (ValueError, TypeError, FileNotFoundError)):
                raise
            root.configuration_error = True
            raise root from None  # its own traceback, without jsonargparse's chain

    def parse_arguments(self, parser, args) -> None:
        self._raw_args = list(sys.argv[1:] if args is None else args)  # to tell what the command line set
        super().parse_arguments(parser, args)

    def _explicit_model_args(self, config) -> set[str]:
        """Names of the model's arguments set in a ``--config`` file or on the command line (not defaults)."""
        model = config_file_section(config.get("config") or [], "model")
        given = set((model.get("init_args") or {}) if isinstance(model, dict) else ())
        for arg in getattr(self, "_raw_args", []):
            match = re.match(r"--model\.(?:init_args\.)?(\w+)", str(arg))
            if match:
                given.add(match.group(1))
        return given

    def link_episode_shape(self, config) -> None:
        """State ``ways`` and the image shape once, in the data: a model with ``ways`` / ``image_shape`` arguments
        (the MAML family, Reptile, Siamese and Relation networks) takes the datamodule's ``episodes.train_ways``
        (:class:`~lightning_mtl.datamodules.EpisodeSettings`) and image shape
        (:meth:`~lightning_mtl.datamodules.EpisodicImages.image_shape_for`) unless they are set for it; set to other
        values, the run stops here with both values named.

        Raises:
            ValueError: ``model.ways`` or ``model.image_shape`` contradicts the data's.
        """
        model, data = config.get("model"), config.get("data")
        if not (hasattr(model, "get") and hasattr(data, "get")) or not model.get("class_path") \
                or not data.get("class_path"):
            return
        try:
            model_cls = _import(model["class_path"])
            data_cls = _import(data["class_path"])
        except (ImportError, AttributeError):
            return  # jsonargparse reports unknown classes
        params = inspect.signature(model_cls.__init__).parameters
        args = data.get("init_args") or {}
        args = args.as_dict() if hasattr(args, "as_dict") else dict(args)
        values = {}
        if "ways" in params and "episodes" in inspect.signature(data_cls.__init__).parameters:
            from lightning_mtl.datamodules import EpisodeSettings

            # the typed group as given (a dict once parsed), over the class's default settings
            default = _default(data_cls, "episodes")
            settings = {**vars(default if isinstance(default, EpisodeSettings) else EpisodeSettings()),
                        **(args.get("episodes") or {})}
            if settings["train_mode"] == "episodes":
                values["ways"] = settings["train_ways"]
        if "image_shape" in params and hasattr(data_cls, "image_shape_for"):
            values["image_shape"] = data_cls.image_shape_for(args)
        explicit = self._explicit_model_args(config)
        for key, value in values.items():
            if value is None:
                continue
            value = list(value) if isinstance(value, tuple) else value
            current = config.get(f"model.init_args.{key}")
            current = list(current) if isinstance(current, tuple) else current
            if key not in explicit:
                config[f"model.init_args.{key}"] = tuple(value) if key == "image_shape" else value
            elif current != value:
                source = "data.episodes.train_ways" if key == "ways" else "the data's image shape"
                error = ValueError(
                    f"model.{key}={current} contradicts {source}={value}: state it once, in the data (remove "
                    f"model.{key}; the model takes it from the data), or make the two equal.")
                error.configuration_error = True
                raise error

    def before_instantiate_classes(self) -> None:
        """Take ``ways`` and the image shape from the data (:meth:`link_episode_shape`) and place the run
        (:func:`run_dirpath`): runs of different models never share a checkpoint folder."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        self.link_episode_shape(config)
        model = config.get("model")
        model = model.as_dict() if hasattr(model, "as_dict") else model
        dirpath, why = run_dirpath(config.get("checkpoint.dirpath"), config.get("config") or [], model)
        if why is not None:
            config["checkpoint.dirpath"] = dirpath
            rank_zero_info(f"checkpoints of this run: {dirpath} ({why})")

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test``: ``predict`` is not offered, as no recipe defines what a prediction of
        an episode or a multi-task batch is written to (Lightning's default would fail at ``predict_dataloader``)."""
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(RecipeCheckpoint, "checkpoint")
        # one non-finite policy for both halves: --nonfinite.mode skip|raise|off
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.set_defaults({
            "checkpoint.monitor": self.monitor,
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.filename": "best-{step}",
            "checkpoint.auto_insert_metric_name": False,
            # a new fit into the same dirpath replaces last.ckpt: with Lightning's version counter it would write
            # last-v1.ckpt and `--ckpt_path best|last` would find the previous run's checkpoints
            "checkpoint.enable_version_counter": False,
            "trainer.logger": {
                "class_path": "lightning_mtl.loggers.WandbLogger",
                "init_args": {"project": "lightning-mtl"},
            },
        })

    def _instantiate_trainer(self, config: dict, callbacks: list) -> Trainer:
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # a CheckpointIO of the config wins
            plugins.append(AtomicCheckpointIO())
        callbacks = [*callbacks, RNGStates()]
        extra = config.get("callbacks") or []
        given = [*callbacks, *(extra if isinstance(extra, list) else [extra])]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
            callbacks.append(IntervalBar() if sys.stdout.isatty()
                             else LineProgress(every_n_steps=config.get("log_every_n_steps") or 50))
        callbacks += self._figures(config.get("logger"), given)
        return super()._instantiate_trainer({**config, "plugins": plugins, "logger": self._with_history(config, given)},
                                            callbacks)

    def _figures(self, logger, given: list) -> list:
        """:class:`~lightning_mtl.figures.ResultFigures` for a run that logs to W&B (the conflict heatmap during
        multi-task training, the test figure and table at the end), unless the config gives its own (e.g. with
        ``heatmap_every: 0``) or matplotlib is missing (said once)."""
        from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

        from lightning_mtl.figures import ResultFigures

        loggers = list(logger) if isinstance(logger, (list, tuple)) else [logger]
        if not any(isinstance(lg, LightningWandbLogger) for lg in loggers):
            return []
        if any(isinstance(c, ResultFigures) for c in given):
            return []
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            rank_zero_info("W&B gets no figures (conflict heatmaps, test figures): they need matplotlib, "
                           "pip install 'lightning-mtl[report]'.")
            return []
        return [ResultFigures()]

    def _with_history(self, config: dict, callbacks: list):
        """The configured logger(s) plus, for ``fit``, :class:`~lightning_mtl.history.MetricsHistory` writing
        ``metrics.jsonl`` into the run's checkpoint folder (appending when the fit resumes from a checkpoint)."""
        logger = config.get("logger")
        checkpoint = next((c for c in callbacks if isinstance(c, RecipeCheckpoint)), None)
        if self.subcommand != "fit" or config.get("fast_dev_run") or checkpoint is None or not checkpoint.dirpath:
            return logger
        if logger is True:  # Lightning's own default logger keeps its folder; no history beside it
            return logger
        resumed = getattr(self.config.get(self.subcommand), "ckpt_path", None) is not None
        history = MetricsHistory(checkpoint.dirpath, append=resumed)
        loggers = [] if logger in (None, False) else list(logger) if isinstance(logger, (list, tuple)) else [logger]
        return [*loggers, history]

    def _resolve_ckpt_path(self) -> None:
        config = self.config_init[self.subcommand]
        config["ckpt_path"] = resolve_checkpoint_alias(config.get("ckpt_path"), config["checkpoint"].dirpath)

    def before_test(self) -> None:
        self._resolve_ckpt_path()
        self._record = self._provenance()

    def before_validate(self) -> None:
        self._resolve_ckpt_path()

    def before_fit(self) -> None:
        self._fit_started = time.time()
        self._record = self._provenance()  # read now: the working tree may change while a long fit runs

    def _provenance(self) -> dict:
        """:func:`lightning_mtl.records.provenance` of this command, on the device the Trainer uses."""
        device = self.trainer.strategy.root_device
        return provenance([sys.argv[0], *getattr(self, "_raw_args", [])],
                          accelerator="cuda" if device.type == "cuda" else "cpu")

    def _write_record(self, name: str, **fields) -> None:
        """A record beside the checkpoints (``run.json`` for a fit, ``test.json`` for a test): what
        ``recipes/report.py`` needs to tell how a result was made (the command's :meth:`_provenance`, read when it
        started; precision and devices) and ``fields`` (a fit's steps and wall time, a test's checkpoint)."""
        dirpath = self.config_init[self.subcommand]["checkpoint"].dirpath
        if dirpath is None or not self.trainer.is_global_zero or self.trainer.fast_dev_run:
            return
        record = {**(getattr(self, "_record", None) or self._provenance()), "subcommand": self.subcommand, **fields,
                  "precision": str(self.trainer.precision), "devices": int(self.trainer.world_size),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        Path(dirpath).mkdir(parents=True, exist_ok=True)
        (Path(dirpath) / name).write_text(json.dumps(record, indent=2) + "\n")

    def _write_run_record(self) -> None:
        self._write_record("run.json", global_step=int(self.trainer.global_step),
                           fit_seconds=round(time.time() - getattr(self, "_fit_started", time.time()), 1))

    def _write_test_record(self) -> None:
        """``test.json``: the test's own record, with the checkpoint it tested (``None``: the model as configured,
        e.g. a frozen pre-trained embedding that is tested without a fit of its own)."""
        tested = self.trainer.ckpt_path
        if tested is not None:
            path = Path(tested).resolve()
            tested = path.relative_to(Path.cwd()).as_posix() if path.is_relative_to(Path.cwd()) else path.as_posix()
        self._write_record("test.json", ckpt_path=tested)

    # these hooks run only when the subcommand has returned on this rank: end the process group (see end_distributed)
    def after_fit(self) -> None:
        self._write_run_record()
        checkpoint = next((c for c in self.trainer.checkpoint_callbacks if isinstance(c, RecipeCheckpoint)), None)
        if (checkpoint is not None and not self.trainer.fast_dev_run and checkpoint.monitor
                and not checkpoint.best_model_path and self.trainer.global_step > 0):
            rank_zero_warn(f"fit ended at step {self.trainer.global_step} without a validation, so no best checkpoint "
                           f"was kept (only {checkpoint.dirpath}/last.ckpt); `--ckpt_path best` will use last.ckpt. "
                           f"Set trainer.val_check_interval <= trainer.max_steps to validate.")
        end_distributed()

    def after_validate(self) -> None:
        end_distributed()

    def after_test(self) -> None:
        """Write the test metrics to ``test_metrics.json`` beside the checkpoint directory (input of delta_m.py)."""
        dirpath = self.config_init[self.subcommand]["checkpoint"].dirpath
        if dirpath is not None and self.trainer.is_global_zero:
            self._write_test_metrics(Path(dirpath).parent / "test_metrics.json")
            self._write_test_record()
        end_distributed()

    def _write_test_metrics(self, out: Path) -> None:
        metrics: dict = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("test/")}
        directions = getattr(self.model, "directions", None)  # {task: {metric: higher_is_better}} (multi-task)
        if isinstance(directions, dict):  # recipes/delta_m.py reads them instead of guessing
            metrics["higher_is_better"] = {f"{t}/{m}": bool(h) for t, d in directions.items() for m, h in d.items()
                                           if f"test/{t}/{m}" in metrics}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        rank_zero_info(f"test metrics written to {out}")
