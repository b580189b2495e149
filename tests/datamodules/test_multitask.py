"""MultiTaskDataModule: CombinedLoader modes, shared-input batches, shuffling seeds, errors, and a Trainer run."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_mtl.batches import MultiTaskBatch
from lightning_mtl.datamodules import MultiTargetDataset, MultiTaskDataModule, TaskSplits
from lightning_mtl.datamodules.multitask import EpochShuffle

SIZES = {"a": 10, "b": 25, "c": 7}  # batch_size 4 → 3, 7 and 2 batches


def tagged(task: int, n: int) -> TensorDataset:
    """Inputs spell (task, sample index); targets are the sample index."""
    x = torch.stack([torch.full((n,), task), torch.arange(n)], dim=1).float()
    return TensorDataset(x, torch.arange(n))


class Toy(MultiTaskDataModule):
    def __init__(self, sizes: dict[str, int] = SIZES, shared: bool = False, **kw) -> None:
        super().__init__(**kw)
        self.sizes, self.shared = sizes, shared

    def build_splits(self) -> TaskSplits:
        if self.shared:
            n = self.sizes["a"]
            ds = MultiTargetDataset(torch.arange(n).float()[:, None], {"u": torch.arange(n), "v": -torch.arange(n)})
            return TaskSplits({"u": n, "v": n}, ds, ds, ds)
        data = {t: tagged(i, n) for i, (t, n) in enumerate(self.sizes.items())}
        return TaskSplits({t: n for t, n in self.sizes.items()}, data, data, data)


def batches(mode: str, split: str = "train", **kw) -> list[MultiTaskBatch]:
    dm = Toy(batch_size=4, mode=mode, eval_mode=mode, **kw)
    dm.setup()
    loader = getattr(dm, f"{split}_dataloader")()
    out = [b for b, _, _ in loader]
    assert len(loader) == len(out)
    return out


@pytest.mark.parametrize("mode,count", [("max_size_cycle", 7), ("min_size", 2), ("sequential", 12)])
def test_modes_batch_counts_and_keys(mode, count):
    got = batches(mode)
    assert len(got) == count and all(isinstance(b, MultiTaskBatch) for b in got)
    if mode == "sequential":
        assert [next(iter(b.x)) for b in got] == ["a"] * 3 + ["b"] * 7 + ["c"] * 2
    else:
        assert all(list(b.x) == list(b.targets) == list(SIZES) for b in got)
    for b in got:
        for t, x in b.x.items():
            assert x.shape[1] == 2 and len(x) == len(b.targets[t]) <= 4
            assert (x[:, 0] == list(SIZES).index(t)).all() and (x[:, 1] == b.targets[t]).all()


def test_sequential_eval_counts_every_sample_once_in_order():
    seen = {t: [] for t in SIZES}
    for b in batches("sequential", split="val"):
        for t, y in b.targets.items():
            seen[t] += y.tolist()
    assert seen == {t: list(range(n)) for t, n in SIZES.items()}


def test_max_size_cycle_covers_largest_task_and_reshuffles_cycled_ones():
    got = batches("max_size_cycle")
    b = torch.cat([x.targets["b"] for x in got]).tolist()
    assert sorted(b) == list(range(25))
    c = torch.cat([x.targets["c"] for x in got]).tolist()  # 7 batches of c: 3.5 passes over 7 samples
    passes = [c[i:i + 7] for i in range(0, 21, 7)]
    assert all(sorted(p) == list(range(7)) for p in passes) and len({tuple(p) for p in passes}) > 1


def test_shared_input_batches():
    dm = Toy(shared=True, batch_size=4)
    dm.setup()
    assert dm.tasks == ["u", "v"] and dm.num_classes == {"u": 10, "v": 10}
    got = list(dm.train_dataloader())
    assert [len(b.x) for b in got] == [4, 4, 2] and all(isinstance(b, MultiTaskBatch) for b in got)
    for b in got:
        assert isinstance(b.x, torch.Tensor) and (b.targets["u"] == b.x[:, 0]).all()
        assert (b.targets["v"] == -b.targets["u"]).all()
    assert sorted(torch.cat([b.targets["u"] for b in got]).tolist()) == list(range(10))


def test_epoch_shuffle_is_seeded_per_epoch_and_pass():
    def order(seed: int, epoch: int, stream: int = 0) -> list[int]:
        s = EpochShuffle(50, seed, stream)
        s.set_epoch(epoch)
        return list(s)

    assert order(0, 0) == order(0, 0) and sorted(order(0, 0)) == list(range(50))
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0) and order(0, 0, 1) != order(0, 0, 0)
    s = EpochShuffle(50, 0)
    first, second = list(s), list(s)
    assert first == order(0, 0) and second != first
    s.set_epoch(0)  # Lightning calls it after a fit's first iter(), which workers may already have drawn from
    assert list(s) not in (first, second), "set_epoch of the current epoch keeps its passes"
    s.set_epoch(1)
    assert list(s) == order(0, 1), "a new epoch starts at its pass 0"


def test_tasks_and_num_classes_after_setup():
    dm = Toy()
    with pytest.raises(RuntimeError, match="call prepare_data\\(\\) and setup\\(\\)"):
        _ = dm.tasks
    dm.setup()
    assert dm.tasks == ["a", "b", "c"] and dm.num_classes == {"a": 10, "b": 25, "c": 7}


def test_unknown_mode_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown mode 'max_size'; valid modes: max_size_cycle, min_size, sequential"):
        Toy(mode="max_size")
    with pytest.raises(ValueError, match="unknown eval_mode 'zip'"):
        Toy(eval_mode="zip")


def test_empty_task_dataset_is_named():
    with pytest.raises(ValueError, match="Toy: the train dataset of 'b' has zero samples"):
        Toy(sizes={"a": 3, "b": 0}).setup()


def test_sequential_training_refused_early():
    with pytest.raises(ValueError, match='mode="sequential" cannot train'):
        Toy(mode="sequential").setup("fit")


class Recorder(L.LightningModule):
    """A linear head per task; records the batches it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleDict({t: torch.nn.Linear(2, n) for t, n in SIZES.items()})
        self.train_seen: list[dict[str, list[int]]] = []
        self.val_seen: list[tuple[str, int]] = []

    def training_step(self, batch: MultiTaskBatch, batch_idx: int):
        assert isinstance(batch, MultiTaskBatch)
        self.train_seen.append({t: y.tolist() for t, y in batch.targets.items()})
        losses = [torch.nn.functional.cross_entropy(self.heads[t](x), batch.targets[t]) for t, x in batch.x.items()]
        return torch.stack(losses).sum()

    def validation_step(self, batch: MultiTaskBatch, batch_idx: int, dataloader_idx: int = 0):
        (task,) = batch.x
        self.val_seen.append((task, dataloader_idx))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(seed: int) -> Recorder:
    model = Recorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=Toy(batch_size=4, seed=seed))
    return model


def test_trainer_fit_gets_multitask_batches_reshuffled_per_epoch():
    model = fit(seed=3)
    assert len(model.train_seen) == 14 and all(list(s) == list(SIZES) for s in model.train_seen)
    epoch0, epoch1 = model.train_seen[:7], model.train_seen[7:]
    assert sorted(sum((s["b"] for s in epoch0), [])) == list(range(25))
    assert [s["b"] for s in epoch0] != [s["b"] for s in epoch1], "the epoch must reseed the shuffle"
    assert fit(seed=3).train_seen == model.train_seen, "same seed, same batches"
    assert sorted(set(model.val_seen)) == [("a", 0), ("b", 1), ("c", 2)]
