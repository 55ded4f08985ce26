"""Training: the diffusion objective (``diffusion.py``) shared by ``lorakit train`` and the demo model's script."""
