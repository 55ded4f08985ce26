"""Files: the safetensors header reader (``header``, no torch), safe tensor loading and writing (``io``) and file
hashes with their one cache (``hashes``)."""
