"""Llama-style decoder, its config and named presets."""

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import KVCache, Transformer

__all__ = ["KVCache", "ModelConfig", "Transformer"]
