"""rkl: TRM-style latent recursion for Kimi-Linear."""

from rkl.config import RecursiveConfig
from rkl.errors import ConfigError, UserError

__all__ = ["RecursiveConfig", "ConfigError", "UserError"]
__version__ = "0.1.0"
