"""Prompt → text-encoder conditioning, the A1111 way.

The prompt (LoRA tags already removed) is split into emphasis pieces, tokenized, and packed into chunks of 75
tokens; a chunk that overflows is cut at its last comma when that comma is among its last 20 tokens, and
``BREAK`` closes a chunk early. Each chunk becomes ``[BOS] + 75 tokens + [EOS/pad]`` (77), is encoded on its own,
its token embeddings are multiplied by their emphasis weights and rescaled to the unweighted mean, and the chunks
are concatenated: a prompt of n chunks gives a (1, 77·n, width) conditioning. Positive and negative conditionings
are padded with empty chunks to the same length.

Textual-inversion embeddings named in the prompt take one token position per vector (kept whole within a chunk
when they fit); their vectors replace the token embeddings at those positions through a forward hook on the text
encoder's input embedding, for the duration of the call — no weight is changed.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import LorakitError
from ..library.embeddings import Embedding
from .emphasis import BREAK, parse_emphasis

CHUNK = 75
COMMA_BACKTRACK = 20


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    vectors: dict[int, tuple[str, int]] = field(default_factory=dict)  # position → (embedding, row)

    def split(self, cut: int) -> tuple["Chunk", "Chunk"]:
        head = Chunk(self.tokens[:cut], self.weights[:cut], {p: v for p, v in self.vectors.items() if p < cut})
        tail = Chunk(self.tokens[cut:], self.weights[cut:], {p - cut: v for p, v in self.vectors.items() if p >= cut})
        return head, tail


class _Packer:
    """Packs (token, weight) pairs into 75-token chunks, cutting at a late comma as A1111 does."""

    def __init__(self, comma: int) -> None:
        self.comma = comma
        self.chunks: list[Chunk] = []
        self.current = Chunk()
        self.last_comma = -1

    def close(self, keep_from: int | None = None) -> None:
        """End the current chunk; tokens from ``keep_from`` on move to the next one."""
        head, self.current = self.current.split(len(self.current.tokens) if keep_from is None else keep_from)
        self.chunks.append(head)
        self.last_comma = -1

    def add(self, token: int, weight: float, vector: tuple[str, int] | None = None) -> None:
        if len(self.current.tokens) == CHUNK:
            late = self.last_comma >= 0 and CHUNK - self.last_comma <= COMMA_BACKTRACK
            self.close(self.last_comma + 1 if late else None)
        if token == self.comma and vector is None:
            self.last_comma = len(self.current.tokens)
        if vector is not None:
            self.current.vectors[len(self.current.tokens)] = vector
        self.current.tokens.append(token)
        self.current.weights.append(weight)

    def add_embedding(self, name: str, count: int, weight: float, placeholder: int) -> None:
        if self.current.tokens and len(self.current.tokens) + count > CHUNK >= count:
            self.close()  # keep the embedding whole in the next chunk
        for row in range(count):
            self.add(placeholder, weight, (name, row))

    def finish(self) -> list[Chunk]:
        if self.current.tokens or not self.chunks:
            self.close()
        return self.chunks


def chunk_prompt(text: str, tokenizer: Any, embeddings: Mapping[str, int] | None = None) -> list[Chunk]:
    """Token ids, emphasis weights and embedding positions, packed into 75-token chunks (unpadded).
    ``embeddings``: name → number of vectors."""
    embeddings = embeddings or {}
    packer = _Packer(tokenizer.convert_tokens_to_ids(",</w>"))
    placeholder = tokenizer.convert_tokens_to_ids("*</w>")
    names, lookup = _names_regex(embeddings), {n.lower(): n for n in embeddings}
    for piece, weight in parse_emphasis(text):
        if (piece, weight) == BREAK:
            packer.close()
            continue
        for part, name in _split_names(piece, names, lookup):
            if name is not None:
                packer.add_embedding(name, embeddings[name], weight, placeholder)
                continue
            for token in tokenizer.convert_tokens_to_ids(tokenizer.tokenize(part)):
                packer.add(token, weight)
    return packer.finish()


def _names_regex(embeddings: Mapping[str, int]) -> re.Pattern[str] | None:
    if not embeddings:
        return None
    alternatives = "|".join(re.escape(n) for n in sorted(embeddings, key=len, reverse=True))
    return re.compile(r"(?<![\w-])(" + alternatives + r")(?![\w-])", re.IGNORECASE)


def _split_names(text: str, names: re.Pattern[str] | None,
                 lookup: Mapping[str, str]) -> Iterator[tuple[str, str | None]]:
    """Text parts and embedding names (spelled as registered: ``lookup`` maps lower case to that), in order."""
    pos = 0
    for m in names.finditer(text) if names is not None else ():
        if m.start() > pos:
            yield text[pos:m.start()], None
        yield m.group(1), lookup[m.group(1).lower()]
        pos = m.end()
    if pos < len(text) or not text:
        yield text[pos:], None


def padded_ids(chunk: Chunk, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(77,) ids ``[BOS] tokens [EOS] pad…`` and (77,) weights (1 for special and pad tokens)."""
    pad = tokenizer.pad_token_id
    ids = [tokenizer.bos_token_id] + chunk.tokens + [tokenizer.eos_token_id]
    ids += [pad] * (CHUNK + 2 - len(ids))
    weights = [1.0] + chunk.weights + [1.0] * (CHUNK + 1 - len(chunk.weights))
    return torch.tensor(ids), torch.tensor(weights)


def encode_chunk(encoder: torch.nn.Module, ids: torch.Tensor, weights: torch.Tensor, clip_skip: int,
                 final_norm: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states of one 77-token chunk (clip skip n: the n-th layer from the end), weighted with the mean
    restored; also the pooled projection when the encoder has one (SDXL's second encoder)."""
    device = _embeddings(encoder).weight.device
    out = encoder(ids[None].to(device), output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip] if clip_skip > 1 or not final_norm else out.last_hidden_state
    if final_norm and clip_skip > 1:
        hidden = _final_norm(encoder)(hidden)
    pooled = getattr(out, "text_embeds", None)
    if bool((weights == 1).all()):
        return hidden, pooled  # the mean restore would multiply by before/after = 1
    before = hidden.float().mean()
    weighted = hidden * weights.to(hidden.device, hidden.dtype)[None, :, None]
    after = weighted.float().mean()
    # A1111 restores the mean: z·(mean before / mean after). A mean near zero (relative to the values' spread —
    # a layer-normed output with no bias) makes that ratio meaningless and overflows to inf/NaN: keep the weighted
    # values as they are then.
    if after.abs() <= 1e-4 * weighted.float().abs().mean():
        return weighted, pooled
    return weighted * (before / after).to(hidden.dtype), pooled


def _embeddings(encoder: torch.nn.Module) -> torch.nn.Embedding:
    """The token embedding of a transformers text encoder."""
    return encoder.get_input_embeddings()  # type: ignore[operator,no-any-return]


def _final_norm(encoder: torch.nn.Module) -> torch.nn.Module:
    model = getattr(encoder, "text_model", encoder)
    return model.final_layer_norm  # type: ignore[return-value]


@dataclass
class Conditioning:
    embeds: torch.Tensor  # (1, 77·n, width)
    pooled: torch.Tensor | None  # (1, proj) for SDXL
    mask: torch.Tensor | None = None  # (1, L): which tokens count, for encoders whose padding is masked (T5 on
    # Chroma, Qwen2.5-VL on Qwen-Image); None: every token

    @property
    def chunks(self) -> int:
        return self.embeds.shape[1] // (CHUNK + 2)


def encode_prompt(text: str, encoders: list[tuple[torch.nn.Module, Any]], clip_skip: int = 1,
                  sdxl: bool = False, min_chunks: int = 1,
                  embeddings: Mapping[str, Embedding] | None = None) -> Conditioning:
    """Encode with one encoder (SD1/SD2) or two (SDXL: penultimate layers side by side, pooled from the second)."""
    embeddings = embeddings or {}
    counts = {name: e.tokens for name, e in embeddings.items()}
    per_encoder = []
    pooled = None
    for index, (encoder, tokenizer) in enumerate(encoders):
        chunks = chunk_prompt(text, tokenizer, counts)
        chunks += [Chunk() for _ in range(min_chunks - len(chunks))]
        hidden = []
        for i, chunk in enumerate(chunks):
            ids, weights = padded_ids(chunk, tokenizer)
            rows = {pos + 1: embedding_vector(embeddings[name], index, row, encoder) for pos, (name, row) in
                    chunk.vectors.items()}
            skip = max(clip_skip, 2) if sdxl else clip_skip
            with _injected(encoder, rows):
                h, p = encode_chunk(encoder, ids, weights, skip, final_norm=not sdxl)
            hidden.append(h)
            if i == 0 and p is not None:
                pooled = p
        per_encoder.append(torch.cat(hidden, dim=1))
    return Conditioning(torch.cat(per_encoder, dim=-1), pooled)


def embedding_vector(embedding: Embedding, encoder_index: int, row: int, encoder: torch.nn.Module) -> torch.Tensor:
    width = _embeddings(encoder).weight.shape[1]
    where = embedding.path or embedding.name
    if encoder_index >= len(embedding.vectors):
        raise LorakitError(f"{where}: embedding {embedding.name!r} has vectors for {len(embedding.vectors)} text "
                           f"encoder(s); this model has more (an SD1/SD2 embedding on SDXL?)")
    vectors = embedding.vectors[encoder_index]
    if vectors.shape[1] != width:
        raise LorakitError(f"{where}: embedding {embedding.name!r} is {vectors.shape[1]} wide, the text encoder "
                           f"expects {width} (made for another base model)")
    return vectors[row]


@contextmanager
def _injected(encoder: torch.nn.Module, rows: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Replace the token embeddings at ``rows`` (position → vector) during one forward."""
    if not rows:
        yield
        return

    def hook(module: torch.nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        for pos, vec in rows.items():
            out[:, pos] = vec.to(out.dtype)
        return out

    handle = _embeddings(encoder).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def encode_pair(prompt: str, negative: str, encoders: list[tuple[torch.nn.Module, Any]], clip_skip: int = 1,
                sdxl: bool = False, embeddings: Mapping[str, Embedding] | None = None
                ) -> tuple[Conditioning, Conditioning]:
    """Positive and negative conditionings with the same number of chunks."""
    tok = encoders[0][1]
    counts = {name: e.tokens for name, e in (embeddings or {}).items()}
    n = max(len(chunk_prompt(prompt, tok, counts)), len(chunk_prompt(negative, tok, counts)))
    with torch.no_grad():
        return (encode_prompt(prompt, encoders, clip_skip, sdxl, n, embeddings),
                encode_prompt(negative, encoders, clip_skip, sdxl, n, embeddings))
