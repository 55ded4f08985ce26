"""Tools that write files: export a diffusers SD1 model as a single-file checkpoint (more to come: merge, bake,
extract, resize, convert)."""
