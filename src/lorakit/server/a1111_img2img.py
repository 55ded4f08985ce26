"""A1111's ``/sdapi/v1/img2img`` request: txt2img's fields plus the init image, the mask and how they are used.

Defaults are A1111's API defaults (``inpainting_fill`` 0 = fill, ``inpaint_full_res`` true with padding 0, mask
blur 4). Images arrive as base64, with or without a ``data:image/…;base64,`` prefix. One init image is used for
every image of the batch (A1111 also takes one per batch image; lorakit refuses more than one, saying so).
Fields lorakit does not use (``image_cfg_scale``, ``initial_noise_multiplier``, ``latent_mask``, …) are ignored.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import Field

from ..errors import ImageInputError
from ..generate.init_image import MAX_BLUR, MAX_PADDING, InitImage
from ..generate.pipeline import Request
from .a1111 import Txt2Img, requests_of
from .images import decode_image


class Img2Img(Txt2Img):
    init_images: list[str] = Field(default_factory=list, max_length=16)
    resize_mode: int = Field(0, ge=0, le=3)
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    mask: str | None = None
    mask_blur: int | None = Field(None, ge=0, le=MAX_BLUR)
    mask_blur_x: int = Field(4, ge=0, le=MAX_BLUR)
    mask_blur_y: int = Field(4, ge=0, le=MAX_BLUR)
    inpainting_fill: int = Field(0, ge=0, le=3)
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = Field(0, ge=0, le=MAX_PADDING)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    include_init_images: bool = False


def init_of(req: Img2Img) -> InitImage:
    if not req.init_images:
        raise ImageInputError("init_images: img2img needs an image (init_images is empty)")
    if len(req.init_images) > 1:
        raise ImageInputError(f"init_images: lorakit takes one init image per request (it is used for every image "
                              f"of the batch), got {len(req.init_images)}; send one request per image")
    blur = (req.mask_blur, req.mask_blur) if req.mask_blur is not None else (req.mask_blur_x, req.mask_blur_y)
    mask = decode_image(req.mask, "mask") if req.mask else None
    return InitImage(decode_image(req.init_images[0], "init_images[0]"), req.denoising_strength, req.resize_mode,
                     mask, blur, req.inpainting_fill, bool(req.inpainting_mask_invert),
                     req.inpaint_full_res and mask is not None, req.inpaint_full_res_padding)


def img2img_requests(req: Img2Img, clip_skip: int, auto_triggers: bool) -> list[Request]:
    """txt2img's requests, each starting from the init image (checked and decoded once)."""
    init = init_of(req)
    init.check()
    return [dataclasses.replace(r, init=init) for r in requests_of(req, clip_skip, auto_triggers)]


def echoed(req: Img2Img) -> dict[str, Any]:
    """The request as A1111 echoes it in ``parameters``: without the images unless ``include_init_images``."""
    body = req.model_dump()
    if not req.include_init_images:
        body["init_images"], body["mask"] = None, None
    return body
