"""The web page with a real-sized collection: 10,000 LoRAs in the folder, measured in headless Chromium.

The folder: tiny but valid kohya files (rank 1 over two layers, a few KB each), 100 per sub-folder, with the mix a
collection has: 85 % for the demo model (the server's model: they fit), 10 % SD1.5-shaped (dimmed, with the
reason), 4 % with no decisive layer (base unknown: "may not fit"), 1 % truncated (unreadable, with the error);
trigger words in the metadata of half of them, a preview PNG beside every fifth. The library's first scan (index
empty) and the ``GET /lorakit/v1/loras`` reply (every entry, ~6 MiB of JSON) are timed on their own: server work.

The page (Debian's ``chromium`` via Playwright, 1280×900, a fresh browser context per run): (a) navigation → the
LoRA browser showing its cards (``window.lorakitTimings.cardsShown``, a ``performance.now()`` mark loras.js sets
once the first cards are laid out; Playwright's wall time from ``goto`` to the first ``.lora-card`` beside it),
with the real server and again with the list reply served from memory — the page's own share (download, JSON
parse, first cards); (b) one search keystroke until the list is updated and laid out, measured in the page
(``performance.now()`` around the ``input`` event's dispatch and a forced layout; the time until the next frame
starts beside it), median and worst of 31 keystrokes typing words that match thousands, hundreds, one and none.

    OMP_NUM_THREADS=1 python benchmarks/page_collection.py [--files 10000] [--dir /tmp/lorakit-page-bench]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.servers: the server in a thread

from lorakit.files.io import save_file
from lorakit.library import Library

ADJECTIVES = ["ink", "watercolor", "pixel", "neon", "retro", "gothic", "pastel", "cinematic", "isometric", "chibi",
              "oil", "charcoal", "vapor", "noir", "lowpoly", "ukiyoe", "cyber", "dreamy", "glitch", "paper"]
NOUNS = ["style", "portrait", "landscape", "city", "forest", "robot", "dragon", "castle", "anime", "sketch",
         "armor", "flowers", "ocean", "knight", "cat", "interior", "space", "food", "car", "mecha"]
# kohya module name -> (out, in): the demo model's (64-wide context and text) and SD1.5's.
DEMO_LAYERS = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (128, 64),
               "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (64, 64)}
SD1_LAYERS = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768)}
UNKNOWN_LAYERS = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": (128, 128)}
TARGETS = {"first render": 1.0, "search keystroke": 0.050}


def rank1(layers: dict[str, tuple[int, int]], gen: torch.Generator) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, (rows, cols) in layers.items():
        out[f"{name}.lora_down.weight"] = torch.randn(1, cols, generator=gen) * 0.1
        out[f"{name}.lora_up.weight"] = torch.randn(rows, 1, generator=gen) * 0.1
        out[f"{name}.alpha"] = torch.tensor(1.0)
    return out


def make_collection(root: Path, n: int) -> None:
    """``n`` LoRA files under ``root`` (see the module docstring for the mix)."""
    gen = torch.Generator().manual_seed(0)
    png = _tiny_png()
    for i in range(n):
        name = f"{ADJECTIVES[i % 20]}_{NOUNS[i // 20 % 20]}_{i:05d}"
        folder = root / f"set_{i // 100:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.safetensors"
        kind = i % 100
        layers = SD1_LAYERS if kind < 10 else UNKNOWN_LAYERS if kind < 14 else DEMO_LAYERS
        meta = {"ss_output_name": name, "ss_network_dim": "1", "ss_network_alpha": "1"}
        if i % 2 == 0:
            meta["modelspec.trigger_phrase"] = f"{ADJECTIVES[i % 20]}{i}, {NOUNS[i // 20 % 20]} art"
        save_file(rank1(layers, gen), path, meta)
        if kind == 99:  # cut inside the data: unreadable
            path.write_bytes(path.read_bytes()[:-40])
        if i % 5 == 0:
            (folder / f"{name}.preview.png").write_bytes(png)


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run"]
# What is typed into the search box, one keystroke at a time, starting from an empty box each time: a first
# letter (thousands match), narrower names, one file's number, and a word that matches nothing.
WORDS = ["neon_cat", "ink_dragon", "03456", "style", "zzz"]
KEYSTROKES_JS = """async (words) => {
  const box = document.getElementById("search"), list = document.getElementById("loras");
  const frame = () => new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve, 0)));
  const out = [];
  for (const word of words) {
    box.value = "";
    box.dispatchEvent(new Event("input", { bubbles: true }));
    await frame();
    for (const ch of word) {
      const t0 = performance.now();
      box.value += ch;
      box.dispatchEvent(new Event("input", { bubbles: true }));
      void list.offsetHeight;  // the update laid out
      const ms = performance.now() - t0;
      const frameMs = await new Promise((resolve) => requestAnimationFrame(() => resolve(performance.now() - t0)));
      out.push({ text: box.value, ms, frameMs, cards: list.childElementCount,
                 count: document.getElementById("lora-count").textContent });
      await frame();  // painted before the next key
    }
  }
  return out;
}"""


def first_render(page: Any, url: str) -> dict[str, float]:
    t = time.perf_counter()
    page.goto(url + "/")
    page.wait_for_selector(".lora-card")
    wall = time.perf_counter() - t
    page.wait_for_function("window.lorakitTimings && window.lorakitTimings.cardsShown")
    marks: dict[str, float] = page.evaluate("window.lorakitTimings")
    return {"wall": wall, **{k: v / 1000 for k, v in marks.items() if isinstance(v, (int, float))}}


def measure_page(url: str, runs: int, keys: bool = True) -> tuple[list[dict[str, float]], list[dict[str, Any]]]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("needs Debian's chromium (apt-get install -y chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        renders = []
        for _ in range(runs):  # a fresh context each time: nothing cached
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            renders.append(first_render(page, url))
            context.close()
        typed: list[dict[str, Any]] = []
        if keys:
            page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            first_render(page, url)
            typed = page.evaluate(KEYSTROKES_JS, WORDS)
        browser.close()
    return renders, typed


def endpoint_seconds(url: str, runs: int = 3) -> tuple[float, int]:
    """Median of ``runs`` requests; the first, made as the server starts, also waits for the list's build."""
    times, size = [], 0
    for _ in range(runs):
        t = time.perf_counter()
        with urllib.request.urlopen(url + "/lorakit/v1/loras") as r:
            size = len(r.read())
        times.append(time.perf_counter() - t)
    return statistics.median(times), size


def served_from_memory(app: Any, body: bytes) -> Any:
    """``app`` with ``GET /lorakit/v1/loras`` answered from ``body`` at once: the page's own share of the time."""
    from starlette.responses import Response

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/lorakit/v1/loras":
            await Response(body, media_type="application/json")(scope, receive, send)
        else:
            await app(scope, receive, send)
    return asgi


def show_runs(label: str, renders: list[dict[str, float]]) -> None:
    print(f"\nfirst render, {label}, each run (s from navigation):")
    for r in renders:
        print(f"  script {r['scriptStart']:.3f} · list requested {r['lorasRequested']:.3f} · received and parsed "
              f"{r['lorasReceived']:.3f} · cards shown {r['cardsShown']:.3f} · Playwright goto→card {r['wall']:.3f}")


def report(renders: list[dict[str, float]], page_only: list[dict[str, float]], keys: list[dict[str, Any]]) -> None:
    show_runs("real server", renders)
    show_runs("list reply from memory", page_only)
    key_ms = [k["ms"] / 1000 for k in keys]
    print(f"\nsearch keystrokes ({len(keys)}): " + ", ".join(f"{k['text']!r} {k['ms']:.1f} ms ({k['count']})"
                                                        for k in keys))
    median = statistics.median
    rows = [("first render (navigation → cards shown), median", median(r["cardsShown"] for r in renders),
             TARGETS["first render"]),
            ("  the same, list reply from memory (page's share)", median(r["cardsShown"] for r in page_only),
             TARGETS["first render"]),
            ("search keystroke → list updated, median", median(key_ms), TARGETS["search keystroke"]),
            ("search keystroke → list updated, worst", max(key_ms), TARGETS["search keystroke"]),
            ("  the same, until the next frame starts, median", median(k["frameMs"] / 1000 for k in keys),
             TARGETS["search keystroke"])]
    print(f"\n| {'measure':<52} | {'measured':>9} | {'target':>8} | result |")
    print(f"|{'-' * 54}|{'-' * 11}|{'-' * 10}|--------|")
    for name, value, target in rows:
        print(f"| {name:<52} | {_fmt(value):>9} | ≤ {_fmt(target):>6} | {'pass' if value <= target else 'FAIL':<6} |")


def _fmt(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 0.1 else f"{seconds:.3f} s"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--dir", default=None, help="keep the collection here (made once, reused)")
    ap.add_argument("--runs", type=int, default=5, help="first-render runs (fresh browser context each)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="lorakit-page-bench-"))
    lib_dir, index = root / "loras", root / "index.sqlite3"
    if not lib_dir.is_dir():
        t = time.perf_counter()
        make_collection(lib_dir, args.files)
        print(f"made {args.files} LoRA files in {time.perf_counter() - t:.1f} s under {lib_dir}")
    index.unlink(missing_ok=True)
    for label in ("library scan, cold (empty index)", "library scan, warm (nothing changed)"):
        t = time.perf_counter()
        library = Library([lib_dir], index=index)
        print(f"{label:<40} {time.perf_counter() - t:6.2f} s  {library.last_scan}")
    from lorakit.models.loading import demo_model
    from lorakit.server import create_app
    from tests.servers import running

    app = create_app(demo_model(), library)
    with running(app) as url:
        t = time.perf_counter()
        with urllib.request.urlopen(url + "/lorakit/v1/loras") as r:
            r.read()
        print(f"{'GET /lorakit/v1/loras at start (built)':<40} {time.perf_counter() - t:6.2f} s")
        seconds, size = endpoint_seconds(url)
        print(f"{'GET /lorakit/v1/loras (median of 3)':<40} {seconds:6.2f} s  {size / 2 ** 20:.1f} MiB")
        renders, _ = measure_page(url, args.runs, keys=False)
        with urllib.request.urlopen(url + "/lorakit/v1/loras") as r:
            body = r.read()
    with running(served_from_memory(app, body)) as url:
        page_only, keys = measure_page(url, args.runs)
    report(renders, page_only, keys)
    if not args.dir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
