"""A lorakit server on a free loopback port, in a thread of the test process (for HTTP clients and browsers)."""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn

from lorakit.files.io import save_file
from lorakit.models.loading import demo_components

from .factories import make_kohya_lora

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "loras"


def demo_lora_folder(root: Path) -> Path:
    """LoRAs for the demo model (three different sets of weights), a full-size SD1.5 one, sidecars."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(EXAMPLES / "demo_style.safetensors", root / "demo_style.safetensors")
    shutil.copy(EXAMPLES / "ink_sketch_sd15.safetensors", root / "ink_sketch_sd15.safetensors")
    comps = {k: v for k, v in demo_components().items() if k != "vae"}
    save_file(make_kohya_lora(comps, "loha", rank=4, seed=1), root / "loha_style.safetensors",
              {"ss_output_name": "loha_style", "modelspec.trigger_phrase": "lohaword"})
    (root / "chars").mkdir(exist_ok=True)
    save_file(make_kohya_lora(comps, lambda p: "lora" if p.startswith("unet") else None, seed=2),
              root / "chars" / "unet_only.safetensors", {})
    (root / "chars" / "unet_only.json").write_text(json.dumps({"activation text": "unetword",
                                                               "preferred weight": 0.6, "negative text": "lowres"}))
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 80, 40)).save(root / "chars" / "unet_only.preview.png")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running(app: Any) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
