"""LightningDataModules of lightning-mtl, installed as ``lightning_mtl.datamodules``."""

from lightning_mtl.datamodules._episodic import EpisodeSettings, EpisodicImages
from lightning_mtl.datamodules.celeba import CelebA
from lightning_mtl.datamodules.dense_tasks import DenseImageTasks
from lightning_mtl.datamodules.episodes import EpisodeSampler, EpisodeStream, FixedEpisodes
from lightning_mtl.datamodules.image_folder import ImageFolderEpisodes
from lightning_mtl.datamodules.l2l_tasks import TaskDatasetEpisodes
from lightning_mtl.datamodules.mini_imagenet import MiniImageNetEpisodes
from lightning_mtl.datamodules.multi_domain import MultiDomainEpisodes
from lightning_mtl.datamodules.multimnist import MultiMNIST, read_idx
from lightning_mtl.datamodules.multitask import MultiTargetDataset, MultiTaskDataModule, TaskSplits
from lightning_mtl.datamodules.nyuv2 import Cityscapes, NYUv2
from lightning_mtl.datamodules.office import DomainTasks, Office31, OfficeHome
from lightning_mtl.datamodules.omniglot import OmniglotEpisodes
from lightning_mtl.datamodules.omniglot_alphabets import OmniglotAlphabets

__all__ = [
    "CelebA",
    "Cityscapes",
    "DenseImageTasks",
    "DomainTasks",
    "EpisodeSampler",
    "EpisodeSettings",
    "EpisodeStream",
    "EpisodicImages",
    "FixedEpisodes",
    "ImageFolderEpisodes",
    "MiniImageNetEpisodes",
    "MultiDomainEpisodes",
    "MultiMNIST",
    "MultiTargetDataset",
    "MultiTaskDataModule",
    "NYUv2",
    "Office31",
    "OfficeHome",
    "OmniglotAlphabets",
    "OmniglotEpisodes",
    "TaskDatasetEpisodes",
    "TaskSplits",
    "read_idx",
]
