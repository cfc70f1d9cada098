"""dsv3: train, serve and analyze DeepSeek-V3-style models the cost-efficient way."""

from dsv3.config import ModelConfig
from dsv3.errors import ConfigError
from dsv3.model.transformer import Transformer, TransformerOutput

__all__ = ["ConfigError", "ModelConfig", "Transformer", "TransformerOutput"]
__version__ = "0.1.0"
