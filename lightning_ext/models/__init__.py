"""Offline demo LightningModules that follow the per-sample loss contract (and plain torch demo models)."""

from lightning_ext.models.char_llama import CharLlama
from lightning_ext.models.char_mlp import CharContextMLP
from lightning_ext.models.continual_mlp import ContinualMLP
from lightning_ext.models.mlp import MLPClassifier
from lightning_ext.models.text_classifier import TextClassifier

__all__ = ["CharContextMLP", "CharLlama", "ContinualMLP", "MLPClassifier", "TextClassifier"]
