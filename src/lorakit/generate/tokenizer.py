"""The CLIP BPE tokenizer, offline: its files ship in ``lorakit/data/clip_tokenizer`` (derived from the OpenAI
CLIP vocabulary by ``scripts/derive_clip_tokenizer.py``). SD1's CLIP-L pads with ``<|endoftext|>``; the OpenCLIP
encoders of SD2 and SDXL (second encoder) pad with ``!`` (id 0)."""
from __future__ import annotations

from functools import lru_cache
from importlib.resources import files
from typing import Any

TOKENIZER_DIR = files("lorakit") / "data" / "clip_tokenizer"
PAD_CLIP_L = "<|endoftext|>"
PAD_OPENCLIP = "!"


@lru_cache(maxsize=4)
def clip_tokenizer(pad_token: str = PAD_CLIP_L) -> Any:
    """A transformers ``CLIPTokenizer`` (77 tokens) built from the shipped files; never downloads."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=77, pad_token=pad_token,
                                        local_files_only=True)
    # lorakit chunks long prompts itself (conditioning.py); transformers' "longer than 77" warning misleads here.
    tok.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tok
