"""img2img and inpainting inputs, prepared the way A1111 prepares them: the init image resized to the request's
size (``resize_mode``), the mask resized the same way, inverted if asked and blurred (``mask_blur``), the masked
area pre-filled (``fill``), "only masked" cropping — and, after decoding, the original pasted back outside the
mask so that unmasked pixels stay the user's.

Names and numbers are A1111's: resize modes 0 just resize, 1 crop and resize, 2 resize and fill, 3 just resize
(latent upscale; here the same as 0); masked content (``inpainting_fill``) 0 fill, 1 original, 2 latent noise,
3 latent nothing. Mask: white = repaint.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from ..errors import ImageInputError

MAX_PIXELS = 64 * 1024 * 1024  # an init image or mask above this is refused before it is decoded
MAX_BYTES = 64 * 1024 * 1024
FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"]  # never EPS/PS (Pillow would run Ghostscript)
RESIZE_MODES = {0: "just resize", 1: "crop and resize", 2: "resize and fill", 3: "just resize (latent upscale)"}
FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}
MAX_BLUR = 64
MAX_PADDING = 256


@dataclass
class InitImage:
    """What img2img/inpainting starts from. ``strength``: A1111's denoising strength (0: the image back through
    the VAE, 1: nothing of it kept but the mask's outside). ``mask`` (white = repaint) makes it inpainting."""

    image: Image.Image
    strength: float = 0.75
    resize_mode: int = 0
    mask: Image.Image | None = None
    mask_blur: tuple[int, int] = (4, 4)  # (x, y): the Gaussian's standard deviation in px, as A1111's
    fill: int = 1  # masked content; lorakit's default keeps the original (A1111's API defaults to 0, fill)
    invert_mask: bool = False
    only_masked: bool = False  # A1111's inpaint_full_res: repaint the mask's region at full size
    padding: int = 32  # around the mask's region with ``only_masked``

    def check(self) -> None:
        """Raise ``ImageInputError`` naming the first setting out of range."""
        if not 0.0 <= self.strength <= 1.0:  # also False for NaN
            raise ImageInputError(f"denoising strength must be from 0 to 1, got {self.strength}")
        if self.resize_mode not in RESIZE_MODES:
            raise ImageInputError(f"resize mode must be one of {_choices(RESIZE_MODES)}, got {self.resize_mode!r}")
        if self.fill not in FILLS:
            raise ImageInputError(f"masked content (inpainting_fill) must be one of {_choices(FILLS)}, got "
                                  f"{self.fill!r}")
        if not all(0 <= b <= MAX_BLUR for b in self.mask_blur):
            raise ImageInputError(f"mask blur must be from 0 to {MAX_BLUR} px, got {self.mask_blur}")
        if not 0 <= self.padding <= MAX_PADDING:
            raise ImageInputError(f"masked area padding must be from 0 to {MAX_PADDING} px, got {self.padding}")


@dataclass
class Prepared:
    """The inputs of one img2img/inpaint run at the request's size."""

    image: Image.Image  # what the pipeline starts from (cropped to the mask's region with only_masked)
    base: Image.Image  # the init image at width×height: what the result is pasted onto
    mask: Image.Image | None  # blurred mask for the pipeline (cropped like ``image``)
    overlay: Image.Image | None  # where the result replaces ``base``: A1111's mask_for_overlay
    crop: tuple[int, int, int, int] | None  # the region repainted, with only_masked


def _choices(table: dict[int, str]) -> str:
    return ", ".join(f"{k} ({v})" for k, v in table.items())


def open_image(data: bytes, what: str) -> Image.Image:
    """The image in ``data`` (PNG, JPEG, WebP, …), fully loaded, in bounded memory; ``ImageInputError`` naming
    ``what`` otherwise."""
    if len(data) > MAX_BYTES:
        raise ImageInputError(f"{what}: {len(data)} bytes is more than the {MAX_BYTES // 2 ** 20} MiB allowed")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # lazy: reads the header only
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise ImageInputError(f"{what}: {width}×{height} pixels is more than the {MAX_PIXELS // 2 ** 20} "
                                  "megapixels allowed")
        image.load()
    except ImageInputError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageInputError(f"{what}: not a readable image (not {', '.join(FORMATS[:-1])} or {FORMATS[-1]})"
                              ) from None
    except Image.DecompressionBombError:
        raise ImageInputError(f"{what}: more than the {MAX_PIXELS // 2 ** 20} megapixels allowed") from None
    except Exception as e:  # PIL raises many types for a broken file (OSError, SyntaxError, ValueError, …)
        raise ImageInputError(f"{what}: not a readable image ({type(e).__name__}: {str(e)[:200]})") from None
    return image


def resize_image(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """``image`` at ``width``×``height`` by A1111's resize mode: 0/3 stretch; 1 scale to cover, then centre-crop;
    2 scale to fit, then fill the bands with the image's edges stretched outwards."""
    if mode in (0, 3):
        return image.resize((width, height), Image.Resampling.LANCZOS)
    ratio, src = width / height, image.width / image.height
    if mode == 1:
        scaled = (width, max(1, round(width / src))) if src < ratio else (max(1, round(height * src)), height)
        resized = image.resize(scaled, Image.Resampling.LANCZOS)
        left, top = (scaled[0] - width) // 2, (scaled[1] - height) // 2
        return resized.crop((left, top, left + width, top + height))
    scaled = (max(1, round(height * src)), height) if src < ratio else (width, max(1, round(width / src)))
    resized = image.resize(scaled, Image.Resampling.LANCZOS)
    out = Image.new(image.mode, (width, height))
    x0, y0 = (width - scaled[0]) // 2, (height - scaled[1]) // 2
    out.paste(resized, (x0, y0))
    w, h = scaled
    bottom, right = height - y0 - h, width - x0 - w
    if y0:  # bands above and below: the first and last rows stretched
        out.paste(resized.crop((0, 0, w, 1)).resize((w, y0)), (0, 0))
    if bottom:
        out.paste(resized.crop((0, h - 1, w, h)).resize((w, bottom)), (0, y0 + h))
    if x0:  # bands left and right: the first and last columns stretched
        out.paste(resized.crop((0, 0, 1, h)).resize((x0, h)), (0, 0))
    if right:
        out.paste(resized.crop((w - 1, 0, w, h)).resize((right, h)), (x0 + w, 0))
    return out


def prepare(init: InitImage, width: int, height: int) -> Prepared:
    """The pipeline's inputs and the overlay for ``init`` at ``width``×``height``."""
    base = resize_image(init.image.convert("RGB"), width, height, init.resize_mode)
    if init.mask is None:
        return Prepared(base, base, None, None, None)
    mask = _mask(init, width, height)
    overlay = Image.fromarray(np.clip(np.asarray(mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8))
    image = fill_masked(base, mask) if init.fill == 0 else base
    crop = crop_region(mask, width, height, init.padding) if init.only_masked else None
    if crop is not None:
        image = image.crop(crop).resize((width, height), Image.Resampling.LANCZOS)
        mask = mask.crop(crop).resize((width, height), Image.Resampling.LANCZOS)
    return Prepared(image, base, mask, overlay, crop)


def _mask(init: InitImage, width: int, height: int) -> Image.Image:
    assert init.mask is not None
    mask = init.mask
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        # A1111's page sends strokes on a transparent canvas: the drawn pixels (alpha) are the mask
        mask = mask.convert("RGBA").getchannel("A")
    mask = resize_image(mask.convert("L"), width, height, init.resize_mode)
    if init.invert_mask:
        mask = ImageOps.invert(mask)
    bx, by = init.mask_blur
    if bx or by:
        mask = mask.filter(ImageFilter.GaussianBlur((bx, by)))
    return mask


def crop_region(mask: Image.Image, width: int, height: int, padding: int) -> tuple[int, int, int, int] | None:
    """The box around the mask's non-zero pixels, ``padding`` px wider on each side, grown to the aspect ratio
    ``width``:``height`` and kept inside the image; ``None`` for an empty mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x0, y0, x1, y1 = box[0] - padding, box[1] - padding, box[2] + padding, box[3] + padding
    w, h = x1 - x0, y1 - y0
    if w / h < width / height:
        w = min(mask.width, math.ceil(h * width / height))
    else:
        h = min(mask.height, math.ceil(w * height / width))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(min(max(0, round(cx - w / 2)), mask.width - w))
    top = int(min(max(0, round(cy - h / 2)), mask.height - h))
    return left, top, left + w, top + h


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the masked area painted with the colours around it, blurred (a normalised convolution at
    falling radii, so near pixels win), leaving nothing of what was there."""
    rgb = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    keep = 1.0 - torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None].round()
    if float(keep.sum()) == 0.0:
        return image  # everything is masked: nothing to take colours from
    filled = (rgb * keep).sum((2, 3), keepdim=True) / keep.sum() * torch.ones_like(rgb)  # the mean colour
    for sigma in (64.0, 16.0, 4.0, 1.0):
        weight = _blur(keep, sigma)
        colour = _blur(rgb * keep, sigma) / weight.clamp_min(1e-6)
        filled = torch.where(weight > 1e-3, colour, filled)
    out = rgb * keep + filled * (1 - keep)
    return Image.fromarray(out[0].permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8).numpy())


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (1, C, H, W), zero outside the image."""
    radius = max(1, min(int(3 * sigma), max(x.shape[-2:])))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), padding=(0, radius), groups=c)
    return torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), padding=(radius, 0), groups=c)


def paste_back(images: list[Image.Image], prepared: Prepared) -> list[Image.Image]:
    """Each generated image with the original outside the mask (A1111's overlay); with only_masked the repainted
    region is first scaled back into its place. Without a mask: the images as they are."""
    if prepared.overlay is None:
        return images
    out = []
    for image in images:
        if prepared.crop is not None:
            x0, y0, x1, y1 = prepared.crop
            canvas = prepared.base.copy()
            canvas.paste(image.resize((x1 - x0, y1 - y0), Image.Resampling.LANCZOS), (x0, y0))
            image = canvas
        out.append(Image.composite(image.convert("RGB"), prepared.base, prepared.overlay))
    return out


def latent_mask(mask: Image.Image, latent_size: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """The mask at latent resolution, 0 or 1, shaped (1, 1, h, w), on ``like``'s device in its dtype."""
    small = mask.resize(latent_size, Image.Resampling.BILINEAR)
    values = torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).round()
    return values[None, None].to(device=like.device, dtype=like.dtype)


def steps_run(steps: int, strength: float) -> int:
    """How many of ``steps`` an img2img run with ``strength`` samples: diffusers' ``int(steps · strength)`` (0: no
    sampling, the init image comes back through the VAE)."""
    return min(int(steps * strength), steps)


def describe(init: InitImage) -> dict[str, Any]:
    """The infotext fields A1111 writes for img2img and inpainting."""
    fields: dict[str, Any] = {"Denoising strength": init.strength}
    if init.mask is not None:
        fields["Mask blur"] = init.mask_blur[0] if init.mask_blur[0] == init.mask_blur[1] else None
        if init.mask_blur[0] != init.mask_blur[1]:
            fields["Mask blur x"], fields["Mask blur y"] = init.mask_blur
        fields["Masked content"] = FILLS[init.fill]
        if init.only_masked:
            fields["Inpaint area"] = "Only masked"
            fields["Masked area padding"] = init.padding
    return fields
