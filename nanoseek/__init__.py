"""nanoseek: the DeepSeek-V3 / R1 recipe as one small, readable PyTorch codebase."""

from nanoseek.config import ConfigError, ModelConfig
from nanoseek.engine import Engine, SamplingParams
from nanoseek.model import Transformer
from nanoseek.tokenizer import load_tokenizer

__version__ = "0.1.0"
__all__ = ["ModelConfig", "ConfigError", "Transformer", "Engine", "SamplingParams", "load_tokenizer"]
