"""LightningDataModules of lightning-mtl, installed as ``lightning_mtl.datamodules``."""

from lightning_mtl.datamodules.episodes import EpisodeSampler, EpisodeStream, FixedEpisodes
from lightning_mtl.datamodules.omniglot import OmniglotEpisodes

__all__ = ["EpisodeSampler", "EpisodeStream", "FixedEpisodes", "OmniglotEpisodes"]
