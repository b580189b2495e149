"""LightningDataModules of lightning-mtl, installed as ``lightning_mtl.datamodules``."""

from lightning_mtl.datamodules.episodes import EpisodeSampler, EpisodeStream, FixedEpisodes
from lightning_mtl.datamodules.image_folder import ImageFolderEpisodes
from lightning_mtl.datamodules.l2l_tasks import TaskDatasetEpisodes
from lightning_mtl.datamodules.mini_imagenet import MiniImageNetEpisodes
from lightning_mtl.datamodules.multimnist import MultiMNIST, read_idx
from lightning_mtl.datamodules.multitask import MultiTargetDataset, MultiTaskDataModule, TaskSplits
from lightning_mtl.datamodules.omniglot import OmniglotEpisodes
from lightning_mtl.datamodules.omniglot_alphabets import OmniglotAlphabets

__all__ = [
    "EpisodeSampler",
    "EpisodeStream",
    "FixedEpisodes",
    "ImageFolderEpisodes",
    "MiniImageNetEpisodes",
    "MultiMNIST",
    "MultiTargetDataset",
    "MultiTaskDataModule",
    "OmniglotAlphabets",
    "OmniglotEpisodes",
    "TaskDatasetEpisodes",
    "TaskSplits",
    "read_idx",
]
