"""The web page end to end in a real headless Chromium (Debian's ``chromium``, driven by Playwright): load the
page, see the LoRA cards (another base dimmed with its reason, an unreadable file with its error), click one,
generate, see the image and its infotext in the gallery; errors as messages, nothing inserted silently that cannot
work. ``LORAKIT_SCREENSHOT=docs/web-page.png`` also saves the screenshot for the docs."""
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
LONG_FOLDER = "a_folder_whose_name_runs_on_and_on_without_a_single_space_to_break_it"
BROKEN = "broken_lora_with_a_long_name_and_no_spaces"
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
    (folder / "old").mkdir()
    shutil.copy(folder / "ink_sketch_sd15.safetensors", folder / "old" / "ink_sketch_sd15.safetensors")  # same stem
    (folder / LONG_FOLDER).mkdir()
    (folder / LONG_FOLDER / f"{BROKEN}.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{")  # cut
    app = create_app(demo_model(), Library([folder], index=folder.parent / "index.sqlite3"))
    profile = tmp_path_factory.mktemp("chromium-profile")
    with running(app) as url, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                       args=FLAGS, viewport={"width": 1280, "height": 900})
        pg = context.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status == 404 else None)
        pg.goto(url + "/")
        yield pg, url
        context.close()
        assert not errors, errors  # no script error, no 404 (favicon included)


def test_cards_show_every_lora_and_dim_other_bases(page: tuple[Any, str]) -> None:
    pg, _ = page
    pg.wait_for_selector(".lora-card")
    names = pg.locator(".lora-card .name").all_inner_texts()
    assert sorted(names) == [BROKEN, "demo_style", "ink_sketch_sd15", "ink_sketch_sd15", "loha_style", "unet_only"]
    dimmed = pg.locator(".lora-card.incompatible")
    assert dimmed.count() == 3 and dimmed.filter(has_text="Stable Diffusion 1.x").count() == 2
    assert "unetword" in pg.locator(".lora-card[data-name='unet_only']").inner_text()
    assert pg.inner_text("#lora-count").startswith("6 LoRAs")
    pg.fill("#search", "loha")
    pg.wait_for_function("document.querySelectorAll('.lora-card').length === 1")
    assert pg.inner_text("#lora-count") == "1 LoRA"
    pg.fill("#search", "")
    pg.wait_for_function("document.querySelectorAll('.lora-card').length === 6")


def test_same_stem_in_two_folders_gives_two_distinct_cards(page: tuple[Any, str]) -> None:
    pg, _ = page
    pg.wait_for_selector(".lora-card")
    top = pg.locator(".lora-card[data-name='ink_sketch_sd15']")
    old = pg.locator(".lora-card[data-name='old/ink_sketch_sd15']")
    assert top.count() == 1 and old.count() == 1
    assert old.locator(".folder").inner_text() == "old/" and top.locator(".folder").count() == 0


def test_unreadable_or_incompatible_loras_are_not_inserted_silently(page: tuple[Any, str]) -> None:
    pg, _ = page
    pg.wait_for_selector(".lora-card")
    pg.fill("#prompt", "a cabin")
    broken = pg.locator(f".lora-card:has-text('{BROKEN}')")
    assert "error-text" in broken.inner_html() and "incompatible" in (broken.get_attribute("class") or "")
    # the error (a long path without spaces) wraps inside its card
    assert broken.evaluate("card => card.scrollWidth <= card.clientWidth + 1")
    broken.click()
    assert pg.input_value("#prompt") == "a cabin" and "cannot be used" in pg.inner_text("#warning")
    pg.once("dialog", lambda dialog: dialog.dismiss())
    pg.click(".lora-card[data-name='ink_sketch_sd15']")
    assert pg.input_value("#prompt") == "a cabin" and "not inserted" in pg.inner_text("#warning")
    pg.once("dialog", lambda dialog: dialog.accept())
    pg.eval_on_selector("#prompt", "el => el.setSelectionRange(el.value.length, el.value.length)")
    pg.click(".lora-card[data-name='ink_sketch_sd15']")
    assert pg.input_value("#prompt") == "a cabin <lora:ink_sketch_sd15:1>"
    assert "Stable Diffusion 1.x" in pg.inner_text("#warning")


def test_double_click_inserts_once_and_the_prompt_is_monospace(page: tuple[Any, str]) -> None:
    pg, url = page
    pg.wait_for_selector(".lora-card")
    pg.fill("#prompt", "")
    pg.dblclick(".lora-card[data-name='demo_style']")
    assert pg.input_value("#prompt") == "<lora:demo_style:1>"
    assert "monospace" in pg.eval_on_selector("#prompt", "el => getComputedStyle(el).fontFamily")
    assert pg.request.get(url + "/favicon.ico").ok


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


def test_validation_error_is_a_message_and_the_progress_bar_goes(page: tuple[Any, str]) -> None:
    pg, _ = page
    pg.fill("#prompt", "a house")
    for field, value in (("#steps", "2"), ("#width", "60"), ("#height", "64")):
        pg.fill(field, value)
    pg.click("#generate")
    pg.wait_for_selector("#error:not([hidden])")
    message = pg.inner_text("#error")
    assert message.startswith("width: ") and "[{" not in message and "loc" not in message, message
    pg.wait_for_timeout(600)  # a progress poll in flight when the request failed must not bring the bar back
    assert pg.is_hidden("#progress")
    assert pg.eval_on_selector("#progress-bar", "bar => bar.style.width") == "0%"
    pg.fill("#width", "64")


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
