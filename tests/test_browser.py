"""The web page end to end in a real headless Chromium (Debian's ``chromium``, driven by Playwright): load the
page, see the LoRA cards (another base dimmed with its reason — FLUX.1 and Chroma ones too, a FLUX.1 card showing
its variant — an unreadable file with its error), click one, generate, see the image and its infotext in the
gallery; errors as messages, nothing inserted silently that cannot work; weight sliders on the prompt's LoRA tags, the progress bar and Interrupt, parameters restored from a dropped
PNG, img2img with an uploaded image and mask, a collection of a few hundred LoRAs listed page by page and searched.
``LORAKIT_SCREENSHOT=docs/web-page.png`` also saves the screenshot for the docs."""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from lorakit.files.io import save_file
from lorakit.library import Library
from lorakit.models.loading import demo_model
from lorakit.server import create_app

from . import flux_files
from .servers import EXAMPLES, demo_lora_folder, running

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
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                       args=FLAGS, viewport={"width": 1280, "height": 900})
        yield context
        context.close()


def open_page(browser: Any, url: str) -> tuple[Any, list[str]]:
    """A new tab on ``url``, and the list its script errors and 404s go to."""
    pg = browser.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status == 404 else None)
    pg.goto(url + "/")
    return pg, errors


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory, browser: Any) -> Iterator[tuple[Any, str]]:
    folder = demo_lora_folder(tmp_path_factory.mktemp("web") / "loras")
    (folder / "old").mkdir()
    shutil.copy(folder / "ink_sketch_sd15.safetensors", folder / "old" / "ink_sketch_sd15.safetensors")  # same stem
    (folder / LONG_FOLDER).mkdir()
    (folder / LONG_FOLDER / f"{BROKEN}.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{")  # cut
    app = create_app(demo_model(), Library([folder], index=folder.parent / "index.sqlite3"))
    with running(app) as url:
        pg, errors = open_page(browser, url)
        yield pg, url
        pg.close()
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


def test_flux_and_chroma_cards_show_their_base_and_are_dimmed_with_the_reason(
        browser: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    """On the demo model: an SD1 LoRA, a FLUX.1 one (its badge the variant, flux-1-dev) and a Chroma one are all
    dimmed, each with its reason; the base filter finds FLUX.1 LoRAs by base."""
    folder = tmp_path_factory.mktemp("flux-page") / "loras"
    folder.mkdir()
    shutil.copy(EXAMPLES / "ink_sketch_sd15.safetensors", folder / "ink_sketch_sd15.safetensors")
    flux_files.kohya_flux(folder / "flux_style.safetensors", guidance=True)
    flux_files.chroma(folder / "chroma_style.safetensors")
    app = create_app(demo_model(), Library([folder], index=folder.parent / "index.sqlite3"))
    with running(app) as url:
        pg, errors = open_page(browser, url)
        pg.wait_for_selector(".lora-card")
        card = lambda name: pg.locator(f".lora-card[data-name='{name}']")
        assert pg.locator(".lora-card.incompatible").count() == 3
        assert card("flux_style").locator(".badge.base").inner_text() == "flux-1-dev"
        assert card("flux_style").locator(".reason").inner_text() == \
            "made for FLUX.1 (flux-1-dev); the model is the embedded demo model"
        assert card("chroma_style").locator(".badge.base").inner_text() == "chroma"  # its base, as SD3 sizes show
        assert card("chroma_style").locator(".reason").inner_text() == \
            "made for Chroma; the model is the embedded demo model"
        assert "Stable Diffusion 1.x" in card("ink_sketch_sd15").locator(".reason").inner_text()
        assert pg.inner_text("#lora-count") == "3 LoRAs · 3 dimmed: made for another base or unreadable"
        pg.select_option("#base-filter", "flux1")
        pg.wait_for_function("document.querySelectorAll('.lora-card').length === 1")
        assert pg.locator(".lora-card .name").all_inner_texts() == ["flux_style"]
        pg.close()
    assert not errors, errors


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


def tag_weights(pg: Any, row: str) -> list[tuple[str, str, str]]:
    """(name, range value, number value) of each weight control under a prompt."""
    rows = pg.eval_on_selector_all(f"#{row} .tag-control", "items => items.map(i => [i.dataset.name, "
                                   "i.querySelector('.tag-range').value, i.querySelector('.tag-weight').value])")
    return [tuple(r) for r in rows]


def test_weight_sliders_rewrite_their_tag_and_follow_hand_edits(page: tuple[Any, str]) -> None:
    pg, _ = page
    pg.fill("#prompt", "a <lora:demo_style:0.8> cabin, <lora:unet_only:0.5:te=1:unet=0.5> <lyco:loha_style>")
    assert tag_weights(pg, "prompt-tags") == [("demo_style", "0.8", "0.8"), ("unet_only", "0.5", "0.5"),
                                             ("loha_style", "1", "1")]
    at = len("a <lora:demo_style:0.8> cabin")
    pg.eval_on_selector("#prompt", f"el => el.setSelectionRange({at}, {at})")  # the cursor after "cabin"
    pg.focus("#prompt-tags .tag-control:nth-child(1) .tag-range")
    pg.keyboard.press("ArrowRight")  # one step: 0.05
    assert pg.input_value("#prompt").startswith("a <lora:demo_style:0.85> cabin,")
    assert pg.eval_on_selector("#prompt", "el => el.value.slice(0, el.selectionStart)").endswith("cabin")
    assert pg.input_value("#prompt-tags .tag-control:nth-child(1) .tag-weight") == "0.85"
    pg.fill("#prompt-tags .tag-control:nth-child(1) .tag-weight", "-0.3")  # the number box writes it too
    assert "<lora:demo_style:-0.3>" in pg.input_value("#prompt")
    assert pg.input_value("#prompt-tags .tag-control:nth-child(1) .tag-range") == "-0.3"
    pg.fill("#prompt-tags .tag-control:nth-child(2) .tag-range", "1.5")  # the tag's other parts stay as written
    pg.fill("#prompt-tags .tag-control:nth-child(3) .tag-range", "0.6")  # no weight yet: one is added
    assert pg.input_value("#prompt") == \
        "a <lora:demo_style:-0.3> cabin, <lora:unet_only:1.5:te=1:unet=0.5> <lyco:loha_style:0.6>"
    assert "overridden" in (pg.get_attribute("#prompt-tags .tag-control:nth-child(2)", "class") or "")
    # hand edits move the sliders; a tag typed in adds one
    pg.fill("#prompt", "x <lora:demo_style:1.25> y <lora:unet_only:0.7:lbw=OUTD>")
    assert tag_weights(pg, "prompt-tags") == [("demo_style", "1.25", "1.25"), ("unet_only", "0.7", "0.7")]
    pg.press("#prompt", "End")
    pg.keyboard.type(" <lora:loha_style:0.3>")
    assert tag_weights(pg, "prompt-tags")[2] == ("loha_style", "0.3", "0.3")
    pg.fill("#prompt-tags .tag-control:nth-child(2) .tag-range", "0.4")
    assert pg.input_value("#prompt") == "x <lora:demo_style:1.25> y <lora:unet_only:0.4:lbw=OUTD> <lora:loha_style:0.3>"
    # the negative prompt has its own; a LoRA inserted by a click gets one at once
    pg.fill("#negative", "blurry <lora:demo_style:-1>")
    pg.fill("#negative-tags .tag-range", "-0.5")
    assert pg.input_value("#negative") == "blurry <lora:demo_style:-0.5>"
    pg.fill("#prompt", "")
    assert pg.is_hidden("#prompt-tags")
    pg.click(".lora-card[data-name='demo_style']")
    assert tag_weights(pg, "prompt-tags") == [("demo_style", "1", "1")]
    pg.fill("#negative", "")


def test_progress_shows_the_steps_and_interrupt_returns_the_partial_image(page: tuple[Any, str]) -> None:
    pg, _ = page
    images = pg.locator("#gallery img").count()
    pg.fill("#prompt", "a slow house")
    for field, value in (("#steps", "40"), ("#width", "128"), ("#height", "128"), ("#seed", "3")):
        pg.fill(field, value)
    pg.click("#generate")
    pg.wait_for_function("/^step [1-9][0-9]* [/] 40/.test(document.querySelector('#progress-text').textContent)",
                         timeout=60_000)
    assert pg.is_visible("#progress") and pg.is_visible("#interrupt")
    assert pg.eval_on_selector("#progress-bar", "bar => parseFloat(bar.style.width)") > 0
    pg.click("#interrupt")
    pg.wait_for_function(f"document.querySelectorAll('#gallery img').length === {images + 1}", timeout=60_000)
    assert re.search(r"interrupted after step \d+", pg.inner_text("#notes"))
    assert pg.is_hidden("#progress") and pg.is_hidden("#interrupt") and pg.is_enabled("#generate")
    for field, value in (("#steps", "4"), ("#width", "64"), ("#height", "64")):
        pg.fill(field, value)


DROP_JS = """([selector, b64, name, type]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, { type }));
  const target = document.querySelector(selector);
  for (const kind of ["dragenter", "dragover", "drop"]) {
    target.dispatchEvent(new DragEvent(kind, { dataTransfer: data, bubbles: true, cancelable: true }));
  }
}"""


def drop(pg: Any, selector: str, data: bytes, name: str, mime: str = "image/png") -> None:
    pg.evaluate(DROP_JS, [selector, base64.b64encode(data).decode(), name, mime])


def png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_a_dropped_png_restores_its_parameters(page: tuple[Any, str]) -> None:
    pg, url = page
    body = {"prompt": "a red circle <lora:demo_style:0.65>", "negative_prompt": "blurry", "steps": 3, "seed": 5,
            "cfg_scale": 6.5, "sampler_name": "Euler", "width": 72, "height": 64}
    made = pg.request.post(url + "/sdapi/v1/txt2img", data=body, timeout=60_000)
    assert made.ok, made.text()
    image = base64.b64decode(made.json()["images"][0])
    pg.fill("#prompt", "")
    pg.fill("#negative", "")
    drop(pg, "#browser", image, "made.png")  # anywhere but the img2img image boxes
    pg.wait_for_function("document.querySelector('#prompt').value !== ''")
    assert pg.input_value("#prompt") == body["prompt"] and pg.input_value("#negative") == "blurry"
    fields = {"#steps": "3", "#seed": "5", "#cfg": "6.5", "#sampler": "Euler", "#width": "72", "#height": "64"}
    assert {f: pg.input_value(f) for f in fields} == fields
    assert tag_weights(pg, "prompt-tags") == [("demo_style", "0.65", "0.65")]
    assert "restored from made.png" in pg.inner_text("#notice")
    # the picker does the same for keyboard users; an image without parameters says so and changes nothing
    pg.set_input_files("#restore-file", files=[{"name": "plain.png", "mimeType": "image/png",
                                                 "buffer": png((8, 8), (1, 2, 3))}])
    pg.wait_for_function("document.querySelector('#notice').textContent.includes('plain.png has no generation')")
    assert "nothing restored" in pg.inner_text("#notice") and pg.input_value("#steps") == "3"
    drop(pg, "#compose", b"hello", "notes.txt", "text/plain")
    assert "notes.txt is not an image" in pg.inner_text("#notice")
    for field, value in (("#steps", "4"), ("#width", "64"), ("#height", "64"), ("#cfg", ""), ("#seed", "-1")):
        pg.fill(field, value)
    pg.select_option("#sampler", "")


def test_img2img_with_an_uploaded_image_and_a_dropped_mask(page: tuple[Any, str]) -> None:
    pg, _ = page
    images = pg.locator("#gallery img").count()
    assert pg.is_hidden("#img2img")
    pg.check("#mode-img2img")
    pg.fill("#prompt", "a blue square <lora:demo_style:0.5>")
    pg.click("#generate")
    pg.wait_for_selector("#error:not([hidden])")
    assert "needs an init image" in pg.inner_text("#error")
    pg.set_input_files("#init-file", files=[{"name": "init.png", "mimeType": "image/png",
                                              "buffer": png((72, 64), (200, 30, 30))}])
    pg.wait_for_selector("#init-preview:not([hidden])")
    assert "72×64" in pg.inner_text("#init-size")
    pg.fill("#width", "512")
    pg.click("#use-size")
    assert (pg.input_value("#width"), pg.input_value("#height")) == ("72", "64")
    mask = Image.new("L", (72, 64), 0)
    mask.paste(255, (0, 0, 36, 64))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    drop(pg, "#mask-zone", buf.getvalue(), "mask.png")  # the mask box takes it: not a parameters restore
    pg.wait_for_selector("#mask-preview:not([hidden])")
    assert pg.input_value("#prompt") == "a blue square <lora:demo_style:0.5>"
    pg.fill("#denoising", "0.5")
    pg.select_option("#resize-mode", "1")
    with pg.expect_request("**/sdapi/v1/img2img") as sent:
        pg.click("#generate")
    fields = sent.value.post_data_json
    assert len(fields["init_images"]) == 1 and fields["mask"] and fields["prompt"].startswith("a blue square")
    assert {k: fields[k] for k in ("denoising_strength", "resize_mode", "mask_blur", "inpainting_fill",
                                   "inpainting_mask_invert", "width", "height")} == \
        {"denoising_strength": 0.5, "resize_mode": 1, "mask_blur": 4, "inpainting_fill": 1,
         "inpainting_mask_invert": 0, "width": 72, "height": 64}
    pg.wait_for_function(f"document.querySelectorAll('#gallery img').length === {images + 1}", timeout=60_000)
    assert "Denoising strength: 0.5" in pg.inner_text("#infotext")
    assert pg.eval_on_selector("#result-image", "img => [img.naturalWidth, img.naturalHeight]") == [72, 64]
    pg.click("#mask-clear")
    pg.check("#mode-txt2img")
    assert pg.is_hidden("#img2img")
    for field, value in (("#width", "64"), ("#height", "64")):
        pg.fill(field, value)


def lora_collection(root: Path, n: int) -> Path:
    """``n`` tiny LoRAs (rank 1, two layers) for the demo model, every tenth SD1.5-shaped; trigger words in some."""
    gen = torch.Generator().manual_seed(0)
    demo = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (128, 64),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (64, 64)}
    sd1 = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768)}
    for i in range(n):
        tensors = {}
        for name, (rows, cols) in (sd1 if i % 10 == 9 else demo).items():
            tensors[f"{name}.lora_down.weight"] = torch.randn(1, cols, generator=gen)
            tensors[f"{name}.lora_up.weight"] = torch.randn(rows, 1, generator=gen) * 0.01
        folder = root / f"set_{i // 50}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, folder / f"lora_{i:04d}.safetensors",
                  {"modelspec.trigger_phrase": f"trig{i:04d}"} if i % 3 == 0 else {})
    return root


def test_a_collection_of_hundreds_is_listed_page_by_page_and_searched(
        browser: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = lora_collection(tmp_path_factory.mktemp("collection") / "loras", 300)
    app = create_app(demo_model(), Library([folder], index=folder.parent / "index.sqlite3"))
    with running(app) as url:
        pg, errors = open_page(browser, url)
        pg.wait_for_selector(".lora-card")
        assert pg.inner_text("#lora-count") == "300 LoRAs · 30 dimmed: made for another base or unreadable"
        assert 0 < pg.locator(".lora-card").count() < 300 and "not shown" in pg.inner_text("#more")
        while pg.locator(".lora-card").count() < 300:  # scrolling to the end shows the rest
            count = pg.locator(".lora-card").count()
            pg.locator("#more").scroll_into_view_if_needed()
            pg.wait_for_function(f"document.querySelectorAll('.lora-card').length > {count}")
        names = pg.eval_on_selector_all(".lora-card .name", "els => els.map(e => e.textContent)")
        assert names == [f"lora_{i:04d}" for i in range(300)] and pg.is_hidden("#more")
        pg.fill("#search", "lora_0123")
        assert pg.eval_on_selector_all(".lora-card .name", "els => els.map(e => e.textContent)") == ["lora_0123"]
        pg.fill("#search", "TRIG0042")  # trigger words, any case
        assert pg.eval_on_selector_all(".lora-card", "els => els.map(e => e.dataset.name)") == ["lora_0042"]
        pg.fill("#search", "")
        pg.select_option("#base-filter", "sd1")
        assert pg.inner_text("#lora-count").startswith("30 LoRAs · 30 dimmed")
        assert pg.locator(".lora-card.incompatible").filter(has_text="Stable Diffusion 1.x").count() == 30
        pg.select_option("#base-filter", "")
        pg.focus(".lora-card[data-name='lora_0001']")  # keyboard users insert with Enter
        pg.keyboard.press("Enter")
        assert pg.input_value("#prompt") == "<lora:lora_0001:1>"
        pg.close()
    assert not errors, errors


def test_first_generate_is_at_the_models_native_size_with_previews_on_the_cards(
        browser: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A new user's first minute (``lorakit serve --lora-dir examples/loras``): the size fields start from the demo
    model's 64 px, the example LoRAs' cards show their shipped previews and the trained trigger apart from the
    caption tags, the README's prompt generates a 64-px picture; after a switch to a 512-px model the fields
    follow it."""
    from lorakit.server.models import ModelCatalog, entry_for

    from .factories import tiny_sd1_pipeline

    root = tmp_path_factory.mktemp("first-minute")
    folder = root / "loras"
    shutil.copytree(EXAMPLES, folder)
    pipe: Any = tiny_sd1_pipeline()
    pipe.save_pretrained(root / "models" / "tiny")
    catalog = ModelCatalog([root / "models"], entry_for(None, [root / "models"]))
    app = create_app(demo_model(), Library([folder], index=root / "index.sqlite3"), catalog=catalog)
    with running(app) as url:
        pg, errors = open_page(browser, url)
        pg.wait_for_selector(".lora-card[data-name='blueprint_style']")
        pg.wait_for_function("document.querySelector('#width').value === '64'")
        assert pg.input_value("#height") == "64"
        for name, trigger in (("blueprint_style", "blueprint"), ("sunset_lokr", "sunset")):
            card = pg.locator(f".lora-card[data-name='{name}']")
            assert "/preview" in card.locator(".thumb").evaluate("t => t.style.backgroundImage")
            assert card.locator(".triggers").inner_text() == f"trigger: {trigger}"
            assert card.locator(".tags").inner_text().startswith("tags: a ")  # the captions, apart
        loaded = "[...document.querySelectorAll('.thumb')].filter(t => t.style.backgroundImage).length"
        assert pg.evaluate(loaded) == 2
        pg.fill("#prompt", "blueprint, a yellow star on the left <lora:blueprint_style:1>")
        pg.fill("#seed", "1")
        pg.click("#generate")
        pg.wait_for_function("document.querySelector('#result-image').src.startsWith('data:image/png')",
                             timeout=60_000)
        assert pg.eval_on_selector("#result-image", "img => img.naturalWidth") == 64
        assert "Size: 64x64" in pg.inner_text("#infotext") and "Steps: 20" in pg.inner_text("#infotext")
        titles = {m["title"].split(" ")[0]: m["title"] for m in pg.request.get(url + "/sdapi/v1/sd-models").json()}
        assert pg.request.post(url + "/sdapi/v1/options", data={"sd_model_checkpoint": titles["tiny"]}).ok
        # the next Generate follows the switch before it posts; the post itself is cut off (a 512-px picture of the
        # tiny model's full-resolution attention takes minutes on a busy 2-core CPU)
        pg.route("**/sdapi/v1/txt2img", lambda route: route.abort())
        pg.fill("#prompt", "a cat")
        pg.click("#generate")
        pg.wait_for_function("!document.querySelector('#error').hidden")
        pg.unroute("**/sdapi/v1/txt2img")
        assert pg.input_value("#width") == pg.input_value("#height") == "512"
        assert pg.inner_text("#model").startswith("model: tiny")
        pg.fill("#width", "64")  # set by hand: kept when the model changes again
        assert pg.request.post(url + "/sdapi/v1/options", data={"sd_model_checkpoint": titles["demo"]}).ok
        pg.click("#generate")
        pg.wait_for_function("document.querySelectorAll('#gallery img').length === 2", timeout=60_000)
        assert pg.input_value("#width") == "64" and pg.input_value("#height") == "64"
        pg.close()
    assert not errors, errors
