"""Tools that write files: merge, bake, extract, resize and convert LoRAs (``docs/tools.md``; ``cli.py`` registers
the commands), and the single-file export of a pipeline (``checkpoint``)."""
