"""Derive the CLIP BPE tokenizer files (vocab.json, merges.txt) that ship in src/lorakit/data/clip_tokenizer.

Source: ``open_clip/bpe_simple_vocab_16e6.txt.gz`` inside the ``open-clip-torch`` wheel (the OpenAI CLIP BPE
file, MIT licence). The vocabulary is built as CLIP's own SimpleTokenizer builds it: 256 byte symbols, the same
with ``</w>``, the first 48,894 merges, then ``<|startoftext|>`` and ``<|endoftext|>`` — 49,408 tokens.

    pip download --no-deps open-clip-torch==3.3.0 -d /tmp/oc
    python scripts/derive_clip_tokenizer.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl
"""
from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "data" / "clip_tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        text = gzip.decompress(z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode("utf-8")
    merges = [tuple(line.split()) for line in text.split("\n")[1:49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                    encoding="utf-8")
    print(f"{len(vocab)} tokens, {len(merges)} merges → {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
