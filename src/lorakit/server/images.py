"""Images sent to the API as base64 (A1111 clients send ``init_images``, ``mask``, png-info's ``image`` so)."""
from __future__ import annotations

import base64
import binascii

from PIL import Image

from ..errors import ImageInputError
from ..generate.init_image import MAX_BYTES, open_image

DATA_URL = "data:"


def decode_image(text: str, what: str) -> Image.Image:
    """The image in base64 ``text``, loaded in bounded memory; ``ImageInputError`` naming ``what`` otherwise."""
    return open_image(decode_base64(text, what), what)


def decode_base64(text: str, what: str) -> bytes:
    """The bytes of base64 ``text`` (a ``data:…;base64,`` prefix and whitespace allowed), checked for size
    before decoding; ``ImageInputError`` naming ``what`` and the problem otherwise."""
    text = text.strip()
    if text.startswith(DATA_URL):
        head, comma, text = text.partition(",")
        if not comma or not head.lower().endswith(";base64"):
            raise ImageInputError(f"{what}: a data URL must be base64 (data:image/png;base64,…)")
    elif text.lower().startswith(("http://", "https://")):
        raise ImageInputError(f"{what}: URLs are not fetched; send the image itself, base64-encoded")
    if not text:
        raise ImageInputError(f"{what}: empty (expected a base64-encoded image)")
    if len(text) > MAX_BYTES // 3 * 4 + 4 * 1024:  # room for line breaks
        raise ImageInputError(f"{what}: {len(text)} base64 characters is more than the {MAX_BYTES // 2 ** 20} MiB "
                              "image allowed")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageInputError(f"{what}: not valid base64 ({e})") from None
