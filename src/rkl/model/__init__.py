"""Base models and the recursive sidecar: refine cells, boundary head, latent token, cache snapshots, wrapper."""

from rkl.model.boundary import BoundaryHead
from rkl.model.cache import CacheSnapshot, caches_equal, new_cache, restore_cache, snapshot_cache
from rkl.model.latent import LatentToken
from rkl.model.refine import RefineCell
from rkl.model.surgery import load_model_with_config, run_surgery, save_sidecar, surgery
from rkl.model.wrapper import ChunkRefineWrapper, RefineResult

__all__ = [
    "BoundaryHead", "CacheSnapshot", "ChunkRefineWrapper", "LatentToken", "RefineCell", "RefineResult",
    "caches_equal", "load_model_with_config", "new_cache", "restore_cache", "run_surgery", "save_sidecar",
    "snapshot_cache", "surgery",
]
