"""Pooling (embedding) models: encoders run once per prompt, their hidden states pooled into one vector.

config.py (PoolerConfig, read from sentence-transformers files), pooler.py (MEAN / CLS / LAST
pooling), registry.py (encoder architectures), engine.py (EmbeddingEngine, the offline path),
async_engine.py (AsyncEmbeddingEngine, batching concurrent server requests).
"""

from pagellm.pooling.config import PoolerConfig

__all__ = ["PoolerConfig"]
