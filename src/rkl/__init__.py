"""rkl: TRM-style latent recursion for Kimi-Linear."""

from rkl.config import RecursiveConfig
from rkl.errors import ConfigError, UserError

__all__ = ["RecursiveConfig", "ConfigError", "UserError"]
__version__ = "0.1.0"

# The model API, imported lazily (PEP 562) so that `import rkl` (and the CLI's startup) does not pull in torch and
# transformers until a model name is actually used.
_MODEL_API = ("ChunkRefineWrapper", "RefineCell", "BoundaryHead", "LatentToken", "RefineResult",
              "load_model_with_config", "snapshot_cache", "restore_cache", "run_surgery")
# what the README's Python API example uses beside the model API: name -> module
_LAZY = {**{name: "rkl.model" for name in _MODEL_API}, "encode_prompt": "rkl.data.prompts",
         "generate_chunks": "rkl.model.generate", "chunk_traces": "rkl.model.trace"}
__all__ += list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rkl' has no attribute {name!r}")
