"""The web page end to end in a real headless Chromium (Debian's ``chromium``, driven by Playwright): load the
page, see the LoRA cards (another base dimmed with its reason), click one, generate, see the image and its
infotext in the gallery. ``LORAKIT_SCREENSHOT=docs/web-page.png`` also saves the screenshot for the docs."""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from lorakit.library import Library
from lorakit.models.loading import demo_model
from lorakit.server import create_app

from .servers import demo_lora_folder, running

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--no-first-run"]

if CHROMIUM is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI needs Debian's chromium for the browser tests: apt-get install -y chromium")
    pytest.skip("no chromium on this machine (apt-get install -y chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    from playwright.sync_api import sync_playwright

    folder = demo_lora_folder(tmp_path_factory.mktemp("web") / "loras")
    app = create_app(demo_model(), Library([folder], index=folder.parent / "index.sqlite3"))
    profile = tmp_path_factory.mktemp("chromium-profile")
    with running(app) as url, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                       args=FLAGS, viewport={"width": 1280, "height": 900})
        pg = context.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto(url + "/")
        yield pg, url
        context.close()
        assert not errors, errors


def test_cards_show_every_lora_and_dim_other_bases(page: tuple[Any, str]) -> None:
    pg, _ = page
    pg.wait_for_selector(".lora-card")
    names = pg.locator(".lora-card .name").all_inner_texts()
    assert sorted(names) == ["demo_style", "ink_sketch_sd15", "loha_style", "unet_only"]
    dimmed = pg.locator(".lora-card.incompatible")
    assert dimmed.count() == 1 and "Stable Diffusion 1.x" in dimmed.inner_text()
    assert "unetword" in pg.locator(".lora-card[data-name='unet_only']").inner_text()
    pg.fill("#search", "loha")
    pg.wait_for_function("document.querySelectorAll('.lora-card').length === 1")
    pg.fill("#search", "")
    pg.wait_for_function("document.querySelectorAll('.lora-card').length === 4")


def test_click_inserts_at_cursor_then_generate(page: tuple[Any, str]) -> None:
    pg, _ = page
    pg.wait_for_selector(".lora-card")
    pg.fill("#prompt", "a cabin in the woods")
    pg.eval_on_selector("#prompt", "el => el.setSelectionRange(1, 1)")  # cursor after "a"
    pg.click(".lora-card[data-name='demo_style']")
    assert pg.input_value("#prompt") == "a <lora:demo_style:1> cabin in the woods"
    pg.check("#insert-triggers")
    pg.eval_on_selector("#prompt", "el => el.setSelectionRange(el.value.length, el.value.length)")
    pg.click(".lora-card[data-name='unet_only']")
    assert pg.input_value("#prompt").endswith("woods <lora:unet_only:0.6>, unetword")
    assert pg.input_value("#negative") == "lowres"  # A1111's "negative text" goes to the negative prompt
    pg.fill("#negative", "")
    for field, value in (("#steps", "4"), ("#width", "64"), ("#height", "64"), ("#seed", "7")):
        pg.fill(field, value)
    pg.click("#generate")
    pg.wait_for_function("document.querySelector('#result-image').src.startsWith('data:image/png')",
                         timeout=60_000)
    text = pg.inner_text("#infotext")
    assert "Seed: 7" in text and 'Lora hashes: "demo_style: 24763f94e151, unet_only:' in text
    assert pg.locator("#gallery img").count() == 1
    assert pg.eval_on_selector("#result-image", "img => img.naturalWidth") == 64
    if os.environ.get("LORAKIT_SCREENSHOT"):
        pg.screenshot(path=os.environ["LORAKIT_SCREENSHOT"], full_page=True)


def test_errors_are_shown_on_the_page(page: tuple[Any, str]) -> None:
    pg, _ = page
    pg.fill("#prompt", "a <lora:no_such_lora:1>")
    pg.fill("#steps", "2")
    pg.click("#generate")
    pg.wait_for_selector("#error:not([hidden])")
    assert "no LoRA named 'no_such_lora'" in pg.inner_text("#error")
    pg.fill("#prompt", "a house")
    pg.click("#generate")
    pg.wait_for_function("document.querySelectorAll('#gallery img').length === 2", timeout=60_000)
