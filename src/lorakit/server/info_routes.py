"""A1111's informational endpoints: ``POST /sdapi/v1/png-info`` (an image's text chunks and its infotext, parsed)
and ``GET /sdapi/v1/embeddings`` (the textual-inversion embeddings of the embedding folders, by whether they fit
the running model's text encoders).

png-info takes ``{"image": "<base64>"}`` (a ``data:image/…;base64,`` prefix and line breaks allowed; URLs are not
fetched). The image is opened by ``generate.init_image.open_image``: size and pixel count bounded before it is
decoded, a broken file refused — each problem a 422 naming it. Text chunks after the pixel data are read too.

embeddings: an embedding fits when prompt encoding would accept it (``generate.conditioning``'s check, called
here, not repeated). A file that cannot be read at all is left out of both lists and logged, as A1111 does.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from fastapi import FastAPI
from PIL import Image
from pydantic import BaseModel

from ..errors import ImageInputError, LorakitError
from ..generate.conditioning import embedding_vector  # the fit check prompt encoding makes
from ..generate.infotext_parse import parse_infotext
from ..library.embeddings import Embedding, EmbeddingIndex
from .images import decode_image

log = logging.getLogger("lorakit.server")
MAX_INFOTEXT_CHARS = 1_000_000  # A1111 infotexts are a few kB; PIL lets a text chunk grow to 64 MB


class PngInfoRequest(BaseModel):
    image: str  # base64, optionally a data URL


def add_info_routes(app: FastAPI, state: Any) -> None:
    """Register the routes on ``app`` (``state``: the server's ``ServerState``)."""

    @app.post("/sdapi/v1/png-info")
    def png_info(req: PngInfoRequest) -> dict[str, Any]:
        return png_info_reply(decode_image(req.image, "image"))

    @app.get("/sdapi/v1/embeddings")
    def embeddings() -> dict[str, dict[str, Any]]:
        conditioner = state.queue.generator.conditioner
        if conditioner is None:  # a family without textual-inversion embeddings (FLUX.1): every one skipped
            every = embeddings_reply(state.queue.generator.family.embeddings, [])  # no encoder refuses one
            return {"loaded": {}, "skipped": {**every["loaded"], **every["skipped"]}}
        return embeddings_reply(conditioner.embeddings, conditioner.encoders)


def text_chunks(image: Image.Image) -> dict[str, str]:
    """The text entries of a loaded image: a PNG's tEXt, zTXt and iTXt chunks (PIL adds those after the pixel data
    to ``info`` when it loads them); binary entries (``exif``, ``icc_profile``, ``dpi``, …) are left out."""
    return {str(k): str(v) for k, v in image.info.items() if isinstance(v, str)}


def png_info_reply(image: Image.Image) -> dict[str, Any]:
    """A1111's reply: ``info`` (the ``parameters`` chunk, or ``""``), ``items`` (every other text chunk) and
    ``parameters`` (``info`` parsed as A1111 parses it)."""
    items = text_chunks(image)
    info = items.pop("parameters", "")
    if len(info) > MAX_INFOTEXT_CHARS:
        raise ImageInputError(f"image: its parameters text is {len(info)} characters; png-info reads at most "
                              f"{MAX_INFOTEXT_CHARS}")
    return {"info": info, "items": items, "parameters": parse_infotext(info)}


def fit_problem(embedding: Embedding, encoders: list[tuple[torch.nn.Module, Any]]) -> str | None:
    """Why prompt encoding would refuse ``embedding`` with these text encoders (SDXL: CLIP-L, then CLIP-G), or
    ``None`` when it fits."""
    for index, (encoder, _) in enumerate(encoders):
        try:
            embedding_vector(embedding, index, 0, encoder)
        except LorakitError as e:
            return str(e)
    return None


def embedding_entry(embedding: Embedding) -> dict[str, Any]:
    """A1111's fields: the training record (or ``None``), ``shape`` (the vector width; SDXL: CLIP-L + CLIP-G,
    2048, as A1111 counts it) and ``vectors`` (the tokens it takes)."""
    return {"step": embedding.step, "sd_checkpoint": embedding.sd_checkpoint,
            "sd_checkpoint_name": embedding.sd_checkpoint_name,
            "shape": sum(int(v.shape[-1]) for v in embedding.vectors), "vectors": embedding.tokens}


def embeddings_reply(index: EmbeddingIndex | None,
                     encoders: list[tuple[torch.nn.Module, Any]]) -> dict[str, dict[str, Any]]:
    """``{"loaded": {name: entry}, "skipped": {name: entry}}``: the embeddings that fit the text encoders, and
    those made for another model. Unreadable files are in neither (logged as warnings)."""
    loaded: dict[str, Any] = {}
    skipped: dict[str, Any] = {}
    for name, embedding in (index.load_each() if index is not None else iter(())):
        if isinstance(embedding, LorakitError):
            log.warning(f"embedding {name} left out of /sdapi/v1/embeddings: {embedding}")
            continue
        target = skipped if fit_problem(embedding, encoders) else loaded
        target[name] = embedding_entry(embedding)
    return {"loaded": loaded, "skipped": skipped}
