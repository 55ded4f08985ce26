"""Architecture knowledge as data: module-name vocabularies, LDM→diffusers names, block ids."""
from .names import unflatten, canonical_te_path
from .ldm import ldm_to_diffusers, is_ldm_path
from .blocks import block_id

__all__ = ["unflatten", "canonical_te_path", "ldm_to_diffusers", "is_ldm_path", "block_id"]
