"""Prompt → text-encoder conditioning, the A1111 way.

The prompt (LoRA tags already removed) is split into emphasis pieces, tokenized, and packed into chunks of 75
tokens; a chunk that overflows is cut at its last comma when that comma is among its last 20 tokens, and
``BREAK`` closes a chunk early. Each chunk becomes ``[BOS] + 75 tokens + [EOS/pad]`` (77), is encoded on its own,
its token embeddings are multiplied by their emphasis weights and rescaled to the unweighted mean, and the chunks
are concatenated: a prompt of n chunks gives a (1, 77·n, width) conditioning. Positive and negative conditionings
are padded with empty chunks to the same length.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .emphasis import BREAK, parse_emphasis

CHUNK = 75
COMMA_BACKTRACK = 20


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def chunk_prompt(text: str, tokenizer: Any) -> list[Chunk]:
    """Token ids and emphasis weights, packed into 75-token chunks (unpadded)."""
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks: list[Chunk] = []
    current = Chunk()
    last_comma = -1

    def close(keep_from: int | None = None) -> None:
        """End the current chunk; tokens from ``keep_from`` on move to the next one."""
        nonlocal current, last_comma
        cut = len(current.tokens) if keep_from is None else keep_from
        chunks.append(Chunk(current.tokens[:cut], current.weights[:cut]))
        current, last_comma = Chunk(current.tokens[cut:], current.weights[cut:]), -1

    for piece, weight in parse_emphasis(text):
        if (piece, weight) == BREAK:
            close()
            continue
        for token in tokenizer.convert_tokens_to_ids(tokenizer.tokenize(piece)):
            if len(current.tokens) == CHUNK:
                near_end = last_comma >= 0 and CHUNK - last_comma <= COMMA_BACKTRACK
                close(last_comma + 1 if near_end else None)
            if token == comma:
                last_comma = len(current.tokens)
            current.tokens.append(token)
            current.weights.append(weight)
    if current.tokens or not chunks:
        close()
    return chunks


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
    out = encoder(ids[None], output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip] if clip_skip > 1 or not final_norm else out.last_hidden_state
    if final_norm and clip_skip > 1:
        hidden = _final_norm(encoder)(hidden)
    before = hidden.mean()
    hidden = hidden * weights.to(hidden.dtype)[None, :, None]
    hidden = hidden * (before / hidden.mean())
    pooled = getattr(out, "text_embeds", None)
    return hidden, pooled


def _final_norm(encoder: torch.nn.Module) -> torch.nn.Module:
    model = getattr(encoder, "text_model", encoder)
    return model.final_layer_norm  # type: ignore[return-value]


@dataclass
class Conditioning:
    embeds: torch.Tensor  # (1, 77·n, width)
    pooled: torch.Tensor | None  # (1, proj) for SDXL

    @property
    def chunks(self) -> int:
        return self.embeds.shape[1] // (CHUNK + 2)


def encode_prompt(text: str, encoders: list[tuple[torch.nn.Module, Any]], clip_skip: int = 1,
                  sdxl: bool = False, min_chunks: int = 1) -> Conditioning:
    """Encode with one encoder (SD1/SD2) or two (SDXL: penultimate layers side by side, pooled from the second)."""
    per_encoder = []
    pooled = None
    for encoder, tokenizer in encoders:
        chunks = chunk_prompt(text, tokenizer)
        chunks += [Chunk() for _ in range(min_chunks - len(chunks))]
        hidden = []
        for i, chunk in enumerate(chunks):
            ids, weights = padded_ids(chunk, tokenizer)
            skip = max(clip_skip, 2) if sdxl else clip_skip
            h, p = encode_chunk(encoder, ids, weights, skip, final_norm=not sdxl)
            hidden.append(h)
            if i == 0 and p is not None:
                pooled = p
        per_encoder.append(torch.cat(hidden, dim=1))
    return Conditioning(torch.cat(per_encoder, dim=-1), pooled)


def encode_pair(prompt: str, negative: str, encoders: list[tuple[torch.nn.Module, Any]], clip_skip: int = 1,
                sdxl: bool = False) -> tuple[Conditioning, Conditioning]:
    """Positive and negative conditionings with the same number of chunks."""
    tok = encoders[0][1]
    n = max(len(chunk_prompt(prompt, tok)), len(chunk_prompt(negative, tok)))
    with torch.no_grad():
        return (encode_prompt(prompt, encoders, clip_skip, sdxl, n),
                encode_prompt(negative, encoders, clip_skip, sdxl, n))
