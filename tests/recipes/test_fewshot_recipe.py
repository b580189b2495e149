"""The few-shot recipe end to end: every config parses and runs a step; real-data fit + test (fp32, bf16-mixed,
2-process DDP on CPU) on Omniglot."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_mtl.cli import resolve_checkpoint_alias

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "fewshot.py"
CONFIGS = sorted((REPO / "recipes" / "configs" / "omniglot").glob("*.yaml"))
# other datasets: Mini-ImageNet images are not available offline (parse only); Tiny-ImageNet's subset is real data
OTHER_CONFIGS = sorted((REPO / "recipes" / "configs").glob("mini_imagenet/*.yaml")) + sorted(
    (REPO / "recipes" / "configs").glob("tiny_imagenet/*.yaml")) + sorted(
    (REPO / "recipes" / "configs").glob("multi_domain/*.yaml"))  # the other few-shot configs


def load_recipe():
    spec = importlib.util.spec_from_file_location("fewshot_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fewshot = load_recipe()


def small_run_args(
    tmp_path: Path, config: str = "protonet_5w1s_quick.yaml", steps: int = 30, precision: str = "32",
) -> list[str]:
    """A short real run of ``config``. fp32 unless a test is about precision: the quick configs' bf16-mixed runs
    6-8x slower on CPUs without AVX-512 BF16 or AMX (Conv-4, torch 2.14.1), and these tests are about the recipe."""
    return [
        "--config", str(REPO / "recipes" / "configs" / "omniglot" / config), f"--trainer.precision={precision}",
        f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}", "--trainer.max_time=null",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}/logs",
        "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=5",
        f"--checkpoint.dirpath={tmp_path}/ckpt", "--data.episodes.val_episodes=20", "--data.episodes.test_episodes=50",
    ]


@pytest.fixture(autouse=True)
def _clean_argv(monkeypatch):
    """LightningCLI also looks at sys.argv; keep pytest's own arguments out of it."""
    monkeypatch.setattr(sys, "argv", [str(RECIPE)])


@pytest.fixture
def data_env(omniglot_root, cache_dir, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MTL_DATA", str(omniglot_root))
    monkeypatch.setenv("LIGHTNING_MTL_CACHE", str(cache_dir))


def test_configs_exist_and_open_with_launch_command():
    names = {c.name for c in CONFIGS}
    for method in ("protonet", "maml"):
        for setting in ("5w1s", "5w5s", "20w1s", "20w5s"):
            assert f"{method}_{setting}.yaml" in names and f"{method}_{setting}_quick.yaml" in names
    assert "protonet_5w1s_demo.yaml" in names
    for config in CONFIGS:
        first = config.read_text().splitlines()[0]
        assert first.startswith("# ") and "recipes/fewshot.py" in first or "make demo" in first, config


@pytest.mark.parametrize("config", CONFIGS + OTHER_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fewshot.main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lightning_mtl.meta." in printed and "precision:" in printed


# evaluation-only configs (a pre-trained embedding, `test` only) have their own end-to-end test
TRAINABLE = [c for c in CONFIGS if "pretrained:" not in c.read_text()]


@pytest.mark.parametrize("config", TRAINABLE, ids=lambda p: p.stem)
def test_config_fast_dev_run(config, data_env, tmp_path):
    """Every config trains a step and validates; at fp32, as bf16 autocast runs Conv-4 6-8x slower on CPUs without
    AVX-512 BF16 (bf16-mixed itself is covered by test_real_fit_then_test_best_and_last and the DDP matrix)."""
    cli = fewshot.main(["fit", "--config", str(config), "--trainer.fast_dev_run=true", "--trainer.max_time=null",
                        "--trainer.precision=32", "--data.episodes.meta_batch_size=2",
                        "--data.episodes.eval_meta_batch_size=2", f"--checkpoint.dirpath={tmp_path}/ckpt",
                        "--trainer.logger=false"])
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_unknown_key_is_refused(capsys):
    with pytest.raises(SystemExit):
        fewshot.main(["fit", "--config", str(CONFIGS[0]), "--data.init_args.wayz=5"])
    assert "wayz" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_real_fit_then_test_best_and_last(precision, data_env, tmp_path):
    # 20-way training episodes (the config's are 60-way): a third of the cost, still far above chance after 30 steps
    args = small_run_args(tmp_path, precision=precision) + ["--data.episodes.train_ways=20"]
    fit = fewshot.main(["fit", *args])
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    assert fit.trainer.callback_metrics["val/acc"] > 0.4  # 5-way chance is 0.2
    for ckpt in ("best", "last"):
        test = fewshot.main(["test", *args, f"--ckpt_path={ckpt}"])
        metrics = test.trainer.callback_metrics
        assert metrics["test/episodes"] == 50
        assert 0.4 < metrics["test/acc"] <= 1 and 0 < metrics["test/acc_ci95"] < 0.1
    metrics_files = list((tmp_path / "logs").rglob("metrics.csv"))
    logged = {k for f in metrics_files for row in csv.DictReader(f.open()) for k, v in row.items() if v}
    assert {"train/loss", "train/acc", "val/acc", "test/acc", "test/acc_ci95", "test/episodes"} <= logged


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test"])
def test_a_finished_run_ends_its_process_group(subcommand, data_env, tmp_path):
    """Gloo threads left at interpreter exit can abort a DDP run that has finished (SIGABRT); each subcommand ends
    the process group once it has returned."""
    import torch.distributed as dist

    args = small_run_args(tmp_path, steps=2)
    if subcommand != "fit":
        fewshot.main(["fit", *args])
        args.append("--ckpt_path=last")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        fewshot.main([subcommand, *args])
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_second_fit_into_the_same_dirpath_is_what_best_and_last_find(data_env, tmp_path):
    """A re-run replaces last.ckpt (no last-v1.ckpt), so `--ckpt_path best|last` never picks the previous run's."""
    fewshot.main(["fit", *small_run_args(tmp_path, steps=4)])
    fewshot.main(["fit", *small_run_args(tmp_path, steps=6)])
    ckpts = tmp_path / "ckpt"
    assert not list(ckpts.glob("last-v*.ckpt")), sorted(p.name for p in ckpts.iterdir())
    assert torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 6
    assert Path(resolve_checkpoint_alias("best", str(ckpts))).name == "best-6.ckpt"


def test_test_ckpt_best_without_fit_says_what_to_do(data_env, tmp_path):
    with pytest.raises(FileNotFoundError, match="run `fit` with this config first"):
        fewshot.main(["test", *small_run_args(tmp_path), "--ckpt_path=best"])


def test_maml_real_fit_and_test(data_env, tmp_path):
    args = small_run_args(tmp_path, "maml_5w1s_quick.yaml", steps=10) + ["--data.episodes.meta_batch_size=4"]
    fewshot.main(["fit", *args])
    test = fewshot.main(["test", *args, "--ckpt_path=last", "--model.eval_inner_steps=3"])
    assert test.trainer.callback_metrics["test/episodes"] == 50
    assert test.trainer.callback_metrics["test/acc"] > 0.3


def _csv_metrics(folder: Path) -> dict[str, float]:
    out = {}
    for f in folder.rglob("metrics.csv"):
        for row in csv.DictReader(f.open()):
            out.update({k: float(v) for k, v in row.items() if v})
    return out


def _run(args: list[str], env: dict) -> None:
    proc = subprocess.run([sys.executable, str(RECIPE), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_ddp_two_processes_fit_and_exact_eval_set(data_env, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
    # 51 test episodes in meta-batches of 16 → 4 batches: uneven across the two ranks
    args = small_run_args(tmp_path, steps=20) + ["--data.episodes.test_episodes=51"]
    _run(["fit", *args, *ddp], env)
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    _run(["test", *args, *ddp, "--ckpt_path=last", f"--trainer.logger.save_dir={tmp_path}/ddp_test"], env)
    _run(["test", *args, "--ckpt_path=last", f"--trainer.logger.save_dir={tmp_path}/single_test"], env)
    ddp_metrics, single = _csv_metrics(tmp_path / "ddp_test"), _csv_metrics(tmp_path / "single_test")
    assert ddp_metrics["test/episodes"] == single["test/episodes"] == 51
    assert abs(ddp_metrics["test/acc"] - single["test/acc"]) < 1e-6
    fit_metrics = _csv_metrics(tmp_path / "logs")
    assert "train/loss" in fit_metrics and "val/acc" in fit_metrics


def test_default_wandb_logger_goes_offline_and_logs(data_env, tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, so no key: the logger must go offline by itself
    config = str(REPO / "recipes" / "configs" / "omniglot" / "protonet_5w1s_demo.yaml")
    with pytest.warns(UserWarning, match="W&B logging offline"):
        fewshot.main(["fit", "--config", config, "--trainer.max_steps=10", "--trainer.val_check_interval=10",
                      "--trainer.precision=32",
                      "--trainer.log_every_n_steps=5", f"--trainer.logger.init_args.save_dir={tmp_path}/wb",
                      f"--checkpoint.dirpath={tmp_path}/ckpt", "--data.episodes.val_episodes=16",
                      "--trainer.enable_progress_bar=false"])
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_recipe_checkpoint_loads_in_plain_python_with_its_own_backbone(data_env, tmp_path):
    """A checkpoint of the recipe rebuilds the backbone it was trained with (here not the default Conv-4: 32 channels
    instead of 64) through ``load_from_checkpoint(path)`` alone, weights-only, and without a warning."""
    import warnings

    from lightning_mtl.meta import ProtoNet

    args = small_run_args(tmp_path, steps=2) + [
        "--model.backbone.init_args.hidden_channels=32",
        "--model.backbone.init_args.out_channels=32", "--data.episodes.train_ways=5"]
    fit = fewshot.main(["fit", *args])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = ProtoNet.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", map_location="cpu")
    trained = fit.model.state_dict()
    assert loaded.backbone.features[0].out_channels == 32
    assert trained.keys() == loaded.state_dict().keys()
    assert all(torch.equal(trained[k], v) for k, v in loaded.state_dict().items())


def test_fast_dev_run_leaves_a_previous_runs_checkpoints_alone(data_env, tmp_path):
    args = small_run_args(tmp_path, steps=2)
    fewshot.main(["fit", *args])
    ckpts = tmp_path / "ckpt"
    before = {p.name: p.read_bytes() for p in ckpts.iterdir()}
    assert "last.ckpt" in before and any(name.startswith("best-") for name in before)
    fewshot.main(["fit", *args, "--trainer.fast_dev_run=true"])
    assert {p.name: p.read_bytes() for p in ckpts.iterdir()} == before
    fewshot.main(["test", *args, "--ckpt_path=best"])  # still the first run's best checkpoint


def test_fit_without_validation_says_so_and_best_falls_back_to_last(data_env, tmp_path):
    args = small_run_args(tmp_path, steps=2) + ["--trainer.val_check_interval=5"]
    with pytest.warns(UserWarning, match="fit ended at step 2 without a validation, so no best checkpoint"):
        fewshot.main(["fit", *args])
    with pytest.warns(UserWarning, match="never validated .* using last.ckpt"):
        test = fewshot.main(["test", *args, "--ckpt_path=best"])
    assert test.trainer.callback_metrics["test/episodes"] == 50


def test_help_lists_what_exists_and_every_class_has_its_help(capsys):
    from lightning_mtl import meta

    with pytest.raises(SystemExit):
        fewshot.main(["--help"])
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.split()}
    models = {n for n in meta.__all__ if isinstance(getattr(meta, n), type)
              and issubclass(getattr(meta, n), meta.EpisodicModule) and n not in ("EpisodicModule", "GradientLearner")}
    assert models | {"OmniglotEpisodes", "MiniImageNetEpisodes", "ImageFolderEpisodes", "Conv4", "ResNet12"} <= listed
    for flag, name in [("--data.help", d) for d in ("OmniglotEpisodes", "MiniImageNetEpisodes",
                                                    "ImageFolderEpisodes")] + [("--model.help", m) for m in models]:
        with pytest.raises(SystemExit) as info:
            fewshot.main(["fit", flag, name])
        assert info.value.code == 0 and capsys.readouterr().out.startswith("usage:"), name


def test_backbone_choices_are_ours_and_the_users_not_all_of_torch_nn(capsys, tmp_path, monkeypatch):
    """`--model.help MAML` lists our exported backbones and the user's own modules as choices, not the hundreds of
    torch.nn / torchvision classes, our LightningModules or our metrics (any class is still accepted by path)."""
    (tmp_path / "my_backbones.py").write_text(
        "import torch\n\nclass TinyNet(torch.nn.Module):\n    def forward(self, x):\n        return x.flatten(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_backbones  # noqa: F401 - imported as a config naming it would

    with pytest.raises(SystemExit):
        fewshot.main(["fit", "--model.help", "MAML"])
    out = " ".join(capsys.readouterr().out.split())
    choices = out.split("--model.backbone BACKBONE", 1)[1].split("known subclasses: ", 1)[1].split(")", 1)[0]
    listed = {c.strip().rstrip(";").split(";")[0] for c in choices.replace("; or any other", ",").split(",")}
    assert {"lightning_mtl.nn.Conv4", "lightning_mtl.nn.ResNet12", "my_backbones.TinyNet"} <= listed, listed
    assert not any(c.startswith(("torch.", "torchvision.")) for c in listed), listed
    assert not {"lightning_mtl.meta.MAML", "lightning_mtl.meta.ProtoNet"} & listed, listed
    assert "or any other by its class path" in choices


def test_a_fit_of_another_model_on_a_config_gets_its_own_run_folder(data_env, tmp_path):
    """`--model MAML` on a ProtoNet config writes to `<config's dirpath>-MAML`: the ProtoNet run's checkpoints are
    untouched, `--ckpt_path best` of each command line finds its own run, and each folder holds the config that made
    it (a `--checkpoint.dirpath` on the command line is taken as it is)."""
    import yaml

    config = yaml.safe_load((REPO / "recipes" / "configs" / "omniglot" / "protonet_5w1s_quick.yaml").read_text())
    config["checkpoint"]["dirpath"] = str(tmp_path / "run" / "checkpoints")
    (tmp_path / "protonet.yaml").write_text(yaml.safe_dump(config))
    args = [a for a in small_run_args(tmp_path, steps=2) if not a.startswith("--checkpoint.dirpath")]
    args[args.index("--config") + 1] = str(tmp_path / "protonet.yaml")
    args += ["--data.episodes.train_ways=5"]
    fewshot.main(["fit", *args])
    protonet = {p.name: p.read_bytes() for p in (tmp_path / "run" / "checkpoints").iterdir()}
    maml = [*args, "--model=lightning_mtl.meta.MAML", "--model.ways=5", "--model.eval_inner_steps=1"]
    fewshot.main(["fit", *maml])
    assert {p.name: p.read_bytes() for p in (tmp_path / "run" / "checkpoints").iterdir()} == protonet
    assert (tmp_path / "run-MAML" / "checkpoints" / "last.ckpt").exists()
    for folder, model in (("run", "ProtoNet"), ("run-MAML", "MAML")):
        saved = yaml.safe_load((tmp_path / folder / "checkpoints" / "config.yaml").read_text())
        assert saved["model"]["class_path"].endswith(f".{model}")
    test = fewshot.main(["test", *maml, "--ckpt_path=best"])
    assert Path(test.trainer.ckpt_path).parent == tmp_path / "run-MAML" / "checkpoints"
    assert type(test.model).__name__ == "MAML"
    assert (tmp_path / "run-MAML" / "test_metrics.json").exists()
    assert not (Path.cwd() / "config.yaml").exists()


def test_episode_settings_round_trip_through_config_yaml_and_the_checkpoint(data_env, tmp_path):
    """`--data.episodes.*` lands in the run's `config.yaml` as the `episodes` group (no flat episode argument left)
    and in the checkpoint's datamodule hyper-parameters as a plain dict (loaded with weights_only=True); the saved
    `config.yaml` runs again as it is, with the same settings."""
    import dataclasses

    import yaml

    from lightning_mtl.datamodules import EpisodeSettings

    names = {f.name for f in dataclasses.fields(EpisodeSettings)}
    args = small_run_args(tmp_path, steps=2) + ["--data.episodes.train_ways=7", "--data.episodes.seed=3"]
    fit = fewshot.main(["fit", *args])
    saved = yaml.safe_load((tmp_path / "ckpt" / "config.yaml").read_text())["data"]["init_args"]
    episodes = saved["episodes"]
    assert set(episodes) == names and not names & set(saved)
    assert (episodes["train_ways"], episodes["seed"], episodes["val_episodes"]) == (7, 3, 20)
    assert EpisodeSettings(**episodes) == fit.datamodule.episodes and fit.datamodule.hparams["episodes"] == episodes
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["datamodule_hyper_parameters"]["episodes"] == episodes
    again = fewshot.main(["test", "--config", str(tmp_path / "ckpt" / "config.yaml"), "--ckpt_path=last",
                          "--trainer.logger=false"])
    assert again.datamodule.episodes == fit.datamodule.episodes
    assert again.trainer.callback_metrics["test/episodes"] == 50


USER_DATAMODULE = '''
import numpy as np

from lightning_mtl.datamodules import EpisodeSettings, EpisodicImages


class Glyphs(EpisodicImages):
    """A user's own episodic dataset: class k is an image of brightness 10 k plus noise (easily told apart)."""

    def __init__(self, classes: int = 12, episodes: EpisodeSettings | None = None) -> None:
        super().__init__(episodes or EpisodeSettings())
        self.classes = classes

    def setup(self, stage=None):
        if self.samplers:
            return
        rng = np.random.default_rng(0)
        base = (np.arange(self.classes) * 10)[:, None, None, None, None]
        arrays = {s: (base + rng.integers(0, 5, (self.classes, 8, 1, 28, 28))).astype(np.uint8)
                  for s in ("train", "val", "test")}
        self.set_splits(arrays, name="Glyphs")
'''


def test_a_users_own_episodic_datamodule_runs_through_the_recipe(tmp_path):
    """`EpisodicImages` subclassed outside the package, its settings as the typed `episodes` group, run by
    `recipes/fewshot.py` from the user's folder (fit, then test of the best checkpoint)."""
    (tmp_path / "my_glyphs.py").write_text(USER_DATAMODULE)
    (tmp_path / "glyphs.yaml").write_text(
        "trainer:\n  max_steps: 20\n  val_check_interval: 20\n  logger: false\n  enable_progress_bar: false\n"
        "  accelerator: cpu\n"
        "model:\n  class_path: lightning_mtl.meta.ProtoNet\n"
        "data:\n  class_path: my_glyphs.Glyphs\n  init_args:\n    classes: 12\n    episodes:\n"
        "      train_ways: 4\n      train_shots: 1\n      train_queries: 3\n      eval_ways: 4\n      eval_shots: 1\n"
        "      eval_queries: 3\n      val_episodes: 10\n      test_episodes: 20\n"
        "checkpoint:\n  dirpath: runs/glyphs/checkpoints\n")
    env = {**os.environ, "PYTHONPATH": ""}
    for command in (["fit"], ["test", "--ckpt_path=best"]):
        proc = subprocess.run([sys.executable, str(RECIPE), *command, "--config", "glyphs.yaml",
                               "--data.episodes.test_episodes=24"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    import json

    metrics = json.loads((tmp_path / "runs" / "glyphs" / "test_metrics.json").read_text())
    assert metrics["test/episodes"] == 24 and metrics["test/acc"] > 0.9
    record = json.loads((tmp_path / "runs" / "glyphs" / "checkpoints" / "run.json").read_text())  # for report.py
    assert record["global_step"] == 20 and record["fit_seconds"] > 0 and record["precision"] == "32-true"
    assert record["command"].endswith("fit --config glyphs.yaml --data.episodes.test_episodes=24")
    from lightning_mtl.records import code_revision

    assert record["commit"] == code_revision()  # read when the fit started (None outside a git checkout)
    tested = json.loads((tmp_path / "runs" / "glyphs" / "checkpoints" / "test.json").read_text())
    assert tested["subcommand"] == "test" and tested["commit"] == record["commit"]
    (best,) = (tmp_path / "runs" / "glyphs" / "checkpoints").glob("best*.ckpt")  # one validation, one best
    assert tested["ckpt_path"] == f"runs/glyphs/checkpoints/{best.name}"
    assert tested["command"].endswith("test --ckpt_path=best --config glyphs.yaml --data.episodes.test_episodes=24")


@pytest.mark.parametrize(("config", "ways", "image_shape"), [
    ("omniglot/maml_20w1s_quick.yaml", 20, (1, 28, 28)), ("mini_imagenet/maml_5w1s.yaml", 5, (3, 84, 84)),
    ("omniglot/reptile_5w1s_quick.yaml", 5, (1, 28, 28))])
def test_ways_and_image_shape_are_stated_once_in_the_data(config, ways, image_shape, tmp_path):
    """The MAML-family configs state ways and the image size in the data only; the model takes them from it."""
    from lightning_mtl.meta import EpisodicModule

    text = (REPO / "recipes" / "configs" / config).read_text()
    model_section = text.split("\nmodel:", 1)[1].split("\ndata:", 1)[0]
    assert "ways:" not in model_section and "image_shape:" not in model_section
    cli = fewshot.FewShotCLI(EpisodicModule, subclass_mode_model=True, subclass_mode_data=True, run=False,
                             args=["--config", str(REPO / "recipes" / "configs" / config), "--trainer.logger=false",
                                   f"--checkpoint.dirpath={tmp_path}/ckpt"])
    assert cli.model.head.out_features == ways and tuple(cli.model.image_shape) == image_shape


def test_multitask_pretraining_then_few_shot_evaluation_of_its_backbone(data_env, tmp_path, monkeypatch):
    """Lake protocol: a multi-task model with one task per background alphabet, then its shared Conv-4 as the
    prototype embedding of EmbeddingBaseline on episodes of the evaluation alphabets (the two configs, shortened)."""
    spec = importlib.util.spec_from_file_location("multitask_recipe", REPO / "recipes" / "multitask.py")
    multitask = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(multitask)
    lake = REPO / "recipes" / "configs" / "omniglot_alphabets" / "lake_background_quick.yaml"
    pretrain = multitask.main(["fit", "--config", str(lake), "--trainer.max_steps=3", "--trainer.val_check_interval=3",
                               "--trainer.logger=false", "--trainer.limit_val_batches=1",
                               f"--checkpoint.dirpath={tmp_path}/mtl"])
    assert len(pretrain.model.task_names) == 30  # the background alphabets
    shared = pretrain.model.architecture.backbone.state_dict()
    test = fewshot.main(["test", "--config", str(REPO / "recipes/configs/omniglot/multitask_embedding_lake_5w1s.yaml"),
                         f"--model.pretrained={tmp_path}/mtl/last.ckpt", "--data.episodes.test_episodes=40",
                         "--trainer.logger=false", f"--checkpoint.dirpath={tmp_path}/emb"])
    loaded = test.model.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in shared.items())
    assert test.trainer.callback_metrics["test/episodes"] == 40
    assert 0.2 < float(test.trainer.callback_metrics["test/acc"]) <= 1
    # a test-only run records what it tested beside its metrics: the resolved config, with the pre-trained weights
    saved = yaml.safe_load((tmp_path / "emb" / "config.yaml").read_text())
    assert saved["model"]["init_args"]["pretrained"] == f"{tmp_path}/mtl/last.ckpt"
    assert (tmp_path / "test_metrics.json").is_file()


def test_multi_domain_config_trains_and_logs_each_domain(data_env, tmp_path):
    """The multi-domain config (Omniglot + the Tiny-ImageNet subset) through the recipe, shortened."""
    if not (Path(os.environ["LIGHTNING_MTL_DATA"]) / "tiny-imagenet" / "tiny-imagenet-200-subset.zip").exists():
        pytest.skip("the Tiny-ImageNet subset is absent")
    cli = fewshot.main(["fit", "--config", str(REPO / "recipes/configs/multi_domain/protonet_5w1s_quick.yaml"),
                        "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.logger=false",
                        "--data.episodes.val_episodes=20", "--trainer.enable_progress_bar=false",
                        f"--checkpoint.dirpath={tmp_path}/ckpt"])
    metrics = cli.trainer.callback_metrics
    assert {"val/omniglot/acc", "val/tiny_imagenet/acc", "val/worst_family_acc", "val/acc"} <= set(metrics)
