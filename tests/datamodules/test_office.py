"""Office-31 and Office-Home: layouts on tiny class-per-folder fixtures, the seeded stratified split, every layout
error, and every recipes/configs/{office31,office_home} config for one step."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_mtl.datamodules.office import Office31, OfficeHome, split_per_class
from lightning_mtl.nn.resnet18 import ResNet18

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "recipes" / "configs").glob("office31/*.yaml")) + sorted(
    (REPO / "recipes" / "configs").glob("office_home/*.yaml"))
METHODS = {"hps_equal", "hps_uw", "hps_dwa", "hps_pcgrad", "hps_mgda", "hps_cagrad", "hps_nash_mtl", "hps_upgrad",
           "hps_famo"}
CLASSES = ["back_pack", "bike", "mug"]
PER_CLASS = {"back_pack": 5, "bike": 10, "mug": 6}


def write_domains(folder: Path, domains: list[str], images_subfolder: bool, per_class: dict[str, int] = PER_CLASS):
    rng = np.random.default_rng(0)
    for domain in domains:
        base = folder / domain / "images" if images_subfolder else folder / domain
        for cls, n in per_class.items():
            (base / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(base / cls / f"frame_{i:04d}.jpg")


def office31(root: Path, images_subfolder: bool = True) -> Path:
    write_domains(root / "office31", ["amazon", "dslr", "webcam"], images_subfolder)
    return root / "office31"


def office_home(root: Path) -> Path:
    folder = root / "OfficeHomeDataset_10072016"
    write_domains(folder, ["Art", "Clipart", "Product", "Real World"], images_subfolder=False)  # the official zip
    (folder / "ImageInfo.csv").write_text("beside the domains\n")
    return folder


def setup(dm):
    dm.prepare_data()
    dm.setup("fit")
    return dm


def names(ds) -> list[tuple[str, int]]:
    return [(n, int(y)) for n, y in zip(ds.names, ds.targets, strict=True)]


@pytest.mark.parametrize("images_subfolder", [True, False], ids=["archive", "flat"])
def test_office31_layouts_samples_and_tasks(tmp_path, images_subfolder):
    office31(tmp_path, images_subfolder)
    dm = setup(Office31(root=str(tmp_path), image_size=8, batch_size=2))
    assert dm.tasks == ["amazon", "dslr", "webcam"] and dm.num_classes == dict.fromkeys(dm.tasks, 3)
    x, y = dm.splits.train["dslr"][0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8 and 0 <= int(y) < 3
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert set(batch.x) == set(dm.tasks) and batch.x["amazon"].shape == (2, 3, 8, 8)


def test_office_home_real_world_with_a_space_and_a_domain_subset(tmp_path):
    office_home(tmp_path)
    dm = setup(OfficeHome(root=str(tmp_path), image_size=8, domains=["Real_World", "Art"]))
    assert dm.tasks == ["Real_World", "Art"] and dm.splits.test["Real_World"].source.name == "Real World"


def test_split_is_stratified_disjoint_covering_and_seeded(tmp_path):
    office31(tmp_path)

    def splits(seed):
        dm = setup(Office31(root=str(tmp_path), split_seed=seed))
        return {s: {d: names(ds) for d, ds in getattr(dm.splits, s).items()} for s in ("train", "val", "test")}

    first, again, other = splits(0), splits(0), splits(1)
    assert first == again and first != other
    for domain in ("amazon", "dslr", "webcam"):
        parts = [set(first[s][domain]) for s in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        every = {(f"{c}/frame_{i:04d}.jpg", k) for k, c in enumerate(CLASSES) for i in range(PER_CLASS[c])}
        assert set().union(*parts) == every
        # per class: round(0.2 n) val and test images, the rest train (5 -> 3/1/1, 10 -> 6/2/2, 6 -> 4/1/1)
        counts = [[sum(y == k for _, y in first[s][domain]) for k in range(3)] for s in ("train", "val", "test")]
        assert counts == [[3, 6, 4], [1, 2, 1], [1, 2, 1]]


def test_split_of_a_class_does_not_depend_on_the_others():
    a = split_per_class({"x": [f"x{i}" for i in range(10)]}, (0.6, 0.2, 0.2), 0, "amazon")
    b = split_per_class({"x": [f"x{i}" for i in range(10)], "y": ["y0", "y1", "y2"]}, (0.6, 0.2, 0.2), 0, "amazon")
    assert all(set(a[s]) <= set(b[s]) for s in a)


def test_missing_dataset_folder_lists_where_and_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="Office-31: no dataset folder at .*office31 or .*office-31.*"
                                                "gatech.*<root>/\\{office31,.*\\}/<domain>/\\[images/\\]<class>"):
        Office31(root=str(tmp_path)).prepare_data()
    with pytest.raises(FileNotFoundError, match="Office-Home: no dataset folder at .*elsewhere.*hemanthdv"):
        OfficeHome(root=str(tmp_path), path="elsewhere").prepare_data()


def test_missing_domain_names_it(tmp_path):
    write_domains(tmp_path / "office31", ["amazon", "webcam"], True)
    with pytest.raises(FileNotFoundError, match="domain folder .*office31/dslr is missing \\(folders present: "
                                                "amazon, webcam\\)"):
        Office31(root=str(tmp_path)).prepare_data()


def test_domains_with_different_classes(tmp_path):
    folder = office31(tmp_path)
    for f in (folder / "webcam" / "images" / "mug").iterdir():
        f.unlink()
    (folder / "webcam" / "images" / "mug").rmdir()
    with pytest.raises(ValueError, match="every domain must hold the same classes, but .*webcam/images lacks mug"):
        setup(Office31(root=str(tmp_path)))


def test_non_image_in_a_class_folder_and_empty_domain(tmp_path):
    folder = office31(tmp_path)
    (folder / "amazon" / "images" / "bike" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="bike/notes.txt in class folder bike is not an image"):
        setup(Office31(root=str(tmp_path)))
    (folder / "amazon" / "images" / "bike" / "notes.txt").unlink()
    (tmp_path / "office-31" / "amazon" / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match="office-31/amazon/images holds no class folder with images"):
        setup(Office31(root=str(tmp_path), path="office-31", domains=["amazon"]))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"domains": ["amazon", "Art"]}, "Office-31 domains must be .* of amazon, dslr, webcam; got \\['amazon', 'Art'\\]"),
    ({"domains": ["dslr", "dslr"]}, "without repeats"),
    ({"train_fraction": 0.7}, "must be positive and sum to 1"),
    ({"image_size": 0}, "need image_size > 0"),
])
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Office31(**kwargs)


def test_resnet18_loads_a_local_torchvision_state_dict_and_never_downloads(tmp_path):
    from torchvision.models import resnet18

    reference = resnet18(weights=None)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    net = ResNet18(weights=str(tmp_path / "resnet18.pth"), imagenet_normalize=True, hidden_dim=16, dropout=0.5)
    assert torch.equal(net.net.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert net.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 16)
    with pytest.raises(ValueError, match="does not fit this ResNet18 .*other shapes \\['conv1.weight'\\]"):
        ResNet18(small_input=True, weights=str(tmp_path / "resnet18.pth"))
    with pytest.raises(FileNotFoundError, match="no download is attempted"):
        ResNet18(weights=str(tmp_path / "absent.pth"))
    assert ResNet18(small_input=True, pool_size=2)(torch.rand(2, 3, 64, 64)).shape == (2, 2048)  # MGDA's encoder


# ---------------------------------------------------------------------------------------------- every config, one step
def load_recipe():
    spec = importlib.util.spec_from_file_location("multitask_recipe_office", REPO / "recipes" / "multitask.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configs_cover_the_methods():
    for dataset in ("office31", "office_home"):
        assert {c.stem for c in CONFIGS if c.parent.name == dataset} == METHODS
    for config in CONFIGS:
        assert config.read_text().startswith(f"# python recipes/multitask.py fit --config recipes/configs/"
                                             f"{config.parent.name}/{config.name} ")


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("office")
    write_domains(root / "office31", ["amazon", "dslr", "webcam"], True, {"a": 3, "b": 3})
    write_domains(root / "OfficeHomeDataset_10072016", ["Art", "Clipart", "Product", "Real_World"], False,
                  {"a": 3, "b": 3})
    return root


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_runs_one_step(config, fixture_root, tmp_path, monkeypatch):
    """One training step (2 images per domain, 32x32) and one validation batch per domain."""
    torch.set_num_threads(1)
    monkeypatch.setattr(sys, "argv", ["multitask.py"])
    cli = load_recipe().main(["fit", "--config", str(config), "--trainer.fast_dev_run=true", "--trainer.logger=false",
                              f"--data.root={fixture_root}", "--data.image_size=32", "--data.batch_size=2",
                              "--data.num_workers=0", "--model.input_shape=[3,32,32]", "--model.diagnostics_every=0",
                              f"--checkpoint.dirpath={tmp_path}/ckpt", f"--trainer.default_root_dir={tmp_path}"])
    metrics = cli.trainer.callback_metrics
    assert len(cli.model.task_names) == (3 if config.parent.name == "office31" else 4)
    assert torch.isfinite(metrics["train/loss"]) and "val/metric_mean" in metrics
    backbone = cli.model.architecture.backbone
    assert backbone.num_features == 512 and backbone.imagenet_normalize
