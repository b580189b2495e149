"""OmniglotAlphabets: the drawing split, argument checks, and the 50 alphabet tasks on the real archives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_mtl.batches import MultiTaskBatch
from lightning_mtl.datamodules import OmniglotAlphabets
from lightning_mtl.datamodules.omniglot_alphabets import split_drawings

CHARS = [f"Alpha/character{i:02d}" for i in range(1, 31)]


def test_split_drawings_disjoint_covering_and_seeded():
    split = split_drawings(CHARS, (10, 4, 6), seed=0)
    assert {s: a.shape for s, a in split.items()} == {"train": (30, 10), "val": (30, 4), "test": (30, 6)}
    for row in range(30):
        drawings = [set(split[s][row].tolist()) for s in ("train", "val", "test")]
        assert set.union(*drawings) == set(range(20)) and sum(map(len, drawings)) == 20, "a drawing in two splits"
    again = split_drawings(CHARS, (10, 4, 6), seed=0)
    assert all((again[s] == split[s]).all() for s in split)
    other = split_drawings(CHARS, (10, 4, 6), seed=1)
    assert any((other[s] != split[s]).any() for s in split)
    assert len({tuple(r) for r in split["train"].tolist()}) > 1, "characters must not share one permutation"


def test_split_of_a_character_ignores_the_others():
    full = split_drawings(CHARS, (10, 4, 6), seed=0)
    subset = split_drawings(CHARS[5:8], (10, 4, 6), seed=0)
    assert all((subset[s] == full[s][5:8]).all() for s in full)


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.0), (0.5, 0.2, 0.2), (0.96, 0.02, 0.02)])
def test_bad_fractions(tmp_path, fractions):
    train, val, test = fractions
    with pytest.raises(ValueError, match="must be positive, sum to 1 and give every split at least one"):
        OmniglotAlphabets(root=str(tmp_path), train_fraction=train, val_fraction=val, test_fraction=test)


# ------------------------------------------------------------------ real data


@pytest.fixture(scope="module")
def alphabets(omniglot_root, cache_dir) -> OmniglotAlphabets:
    dm = OmniglotAlphabets(root=str(omniglot_root), cache_dir=str(cache_dir), download=False)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_fifty_alphabets_and_their_class_counts(alphabets):
    counts = alphabets.num_classes
    assert len(alphabets.tasks) == 50 and sum(counts.values()) == 1623
    assert sum(list(counts.values())[:30]) == 964, "the 30 background alphabets come first"
    assert counts["Latin"] == 26 and counts["Greek"] == 24 and counts["Korean"] == 40
    assert min(counts.values()) == 14 and max(counts.values()) == 55


def test_split_sizes_labels_and_images(alphabets):
    for split, per_char in (("train", 10), ("val", 4), ("test", 6)):
        data = getattr(alphabets.splits, split)
        assert list(data) == alphabets.tasks
        for task, ds in data.items():
            x, y = ds.tensors
            n = alphabets.num_classes[task]
            assert x.shape == (n * per_char, 1, 28, 28) and x.dtype == torch.uint8
            assert torch.bincount(y, minlength=n).tolist() == [per_char] * n


def test_no_drawing_in_two_splits(alphabets):
    latin = {s: getattr(alphabets.splits, s)["Latin"].tensors[0].flatten(1) for s in ("train", "val", "test")}
    images = {s: {bytes(row.numpy()) for row in x} for s, x in latin.items()}
    assert sum(map(len, images.values())) == 26 * 20, "every drawing of Latin appears once"
    assert not (images["train"] & images["val"] or images["train"] & images["test"] or images["val"] & images["test"])


def test_subset_keeps_drawings_and_batches(omniglot_root, cache_dir, alphabets):
    chosen = ["Tifinagh", "Latin", "Braille", "Tengwar"]
    dm = OmniglotAlphabets(root=str(omniglot_root), cache_dir=str(cache_dir), alphabets=chosen, batch_size=16)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.tasks == chosen and dm.num_classes == {a: alphabets.num_classes[a] for a in chosen}
    for task in chosen:
        for a, b in zip(dm.splits.test[task].tensors, alphabets.splits.test[task].tensors, strict=True):
            assert torch.equal(a, b), "the same split_seed must give the same drawings"
    loader = dm.train_dataloader()
    batch, _, _ = next(iter(loader))
    assert isinstance(batch, MultiTaskBatch) and list(batch.x) == chosen
    assert batch.x["Latin"].shape == (16, 1, 28, 28) and int(batch.targets["Latin"].max()) < 26
    assert len(loader) == -(-55 * 10 // 16), "max_size_cycle: the largest alphabet (Tifinagh, 55) sets the length"


def test_unknown_alphabet(omniglot_root, cache_dir):
    dm = OmniglotAlphabets(root=str(omniglot_root), cache_dir=str(cache_dir), alphabets=["Latin", "Elvish"])
    dm.prepare_data()
    with pytest.raises(ValueError, match=r"unknown Omniglot alphabets \['Elvish'\]; available: Alphabet_of_the_Magi"):
        dm.setup()


def test_other_split_seed_changes_drawings(omniglot_root, cache_dir, alphabets):
    dm = OmniglotAlphabets(root=str(omniglot_root), cache_dir=str(cache_dir), alphabets=["Latin"], split_seed=1)
    dm.prepare_data()
    dm.setup()
    assert not torch.equal(dm.splits.train["Latin"].tensors[0], alphabets.splits.train["Latin"].tensors[0])
    np.testing.assert_array_equal(dm.splits.train["Latin"].tensors[1], alphabets.splits.train["Latin"].tensors[1])


def test_lake_background_and_evaluation_alphabets(omniglot_root, cache_dir):
    """``alphabets="background"`` / ``"evaluation"``: Lake et al.'s 30 / 20 alphabets, 964 / 659 characters."""
    from lightning_mtl.datamodules import OmniglotAlphabets

    counts = {}
    for group in ("background", "evaluation"):
        data = OmniglotAlphabets(root=str(omniglot_root), cache_dir=str(cache_dir), download=False, alphabets=group)
        data.prepare_data()
        data.setup("fit")
        counts[group] = (len(data.tasks), sum(data.num_classes.values()))
    assert counts == {"background": (30, 964), "evaluation": (20, 659)}
