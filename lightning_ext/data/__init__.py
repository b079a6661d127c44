"""Offline demo datamodules (no downloads): stdlib source as a char-LM corpus, sklearn digits."""

from lightning_ext.data.digits import DigitsDataModule
from lightning_ext.data.resumable import ResumableDataModule
from lightning_ext.data.sampler import ResumableSampler
from lightning_ext.data.split_digits import SplitDigitsDataModule
from lightning_ext.data.stdlib_chars import StdlibCharDataModule
from lightning_ext.data.tweets import TweetSentimentDataModule

__all__ = ["DigitsDataModule", "ResumableDataModule", "ResumableSampler", "SplitDigitsDataModule",
           "StdlibCharDataModule",
           "TweetSentimentDataModule"]
