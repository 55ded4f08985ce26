"""Architecture knowledge as data: module-name vocabularies, LDM→diffusers names, block ids."""
from .blocks import block_id
from .ldm import is_ldm_path, ldm_to_diffusers
from .names import canonical_te_path, unflatten

__all__ = ["unflatten", "canonical_te_path", "ldm_to_diffusers", "is_ldm_path", "block_id"]
