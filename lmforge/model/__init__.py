"""Llama-style decoder, its config and named presets."""

from lmforge.model.config import ModelConfig
from lmforge.model.kv_cache import KVCache, KVCacheRows
from lmforge.model.transformer import Transformer

__all__ = ["KVCache", "KVCacheRows", "ModelConfig", "Transformer"]
