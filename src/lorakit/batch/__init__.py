"""Beyond one image: X/Y/Z grids and the block-effect analyzer (``grid``, ``analyze``), and batches of requests
from a JSONL file, locally or on Ray (``jobs``, ``ray_runner``). ``cli.add_batch_commands`` adds the commands."""
