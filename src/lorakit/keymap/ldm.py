"""LDM/SGM UNet names (``input_blocks.4.1.…``) → diffusers names (``down_blocks.1.attentions.0.…``).

One formula serves SD1/SD2 (four down blocks) and SDXL (three): input block N≥1 is down block (N−1)//3, layer
(N−1)%3, where layer 2 is the downsampler; output block N is up block N//3, layer N%3.
"""
from __future__ import annotations

RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
        "out.0": "conv_norm_out", "out.2": "conv_out", "input_blocks.0.0": "conv_in"}
_ATTN_FIRST = {"norm", "proj_in", "proj_out", "transformer_blocks"}


def is_ldm_path(path: str) -> bool:
    head = path.split(".", 1)[0]
    return head in {"input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb"} or \
        path.startswith(("out.0", "out.2"))


def _resnet_rest(rest: str) -> str | None:
    for old, new in RESNET.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return None


def ldm_to_diffusers(path: str) -> str | None:
    """Map one LDM module path; ``None`` when it is not an LDM UNet path we know."""
    for old, new in TOP.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    parts = path.split(".")
    if parts[0] == "middle_block" and len(parts) > 2 and parts[1].isdigit():
        return _middle_block(int(parts[1]), ".".join(parts[2:]))
    if len(parts) < 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    head, n, sub, rest = parts[0], int(parts[1]), int(parts[2]), ".".join(parts[3:])
    if head == "input_blocks" and n >= 1:
        return _input_block(n, sub, rest)
    if head == "output_blocks":
        return _output_block(n, sub, rest)
    return None


def _layer(prefix: str, sub: int, j: int, rest: str) -> str | None:
    if sub == 0:
        mapped = _resnet_rest(rest)
        return None if mapped is None else f"{prefix}.resnets.{j}.{mapped}"
    if rest.split(".", 1)[0] in _ATTN_FIRST:
        return f"{prefix}.attentions.{j}.{rest}"
    return None


def _input_block(n: int, sub: int, rest: str) -> str | None:
    i, j = divmod(n - 1, 3)
    if j == 2:  # downsampler: input_blocks.N.0.op
        return f"down_blocks.{i}.downsamplers.0.conv" if sub == 0 and rest == "op" else None
    return _layer(f"down_blocks.{i}", sub, j, rest)


def _middle_block(n: int, rest: str) -> str | None:
    if n == 1:
        return f"mid_block.attentions.0.{rest}" if rest.split(".", 1)[0] in _ATTN_FIRST else None
    mapped = _resnet_rest(rest)
    return None if mapped is None or n not in (0, 2) else f"mid_block.resnets.{n // 2}.{mapped}"


def _output_block(n: int, sub: int, rest: str) -> str | None:
    i, j = divmod(n, 3)
    if sub >= 1 and rest == "conv":  # upsampler sits at .1 (no attention) or .2
        return f"up_blocks.{i}.upsamplers.0.conv"
    return _layer(f"up_blocks.{i}", sub, j, rest)


def diffusers_to_ldm(path: str, attn_up_blocks: tuple[int, ...] = (1, 2, 3)) -> str | None:
    """The inverse of ``ldm_to_diffusers`` for full-size UNets (three layers per block), built from the same
    tables; ``None`` for a path with no LDM name. The upsampler of up block i sits at ``.2`` when the block has
    attentions (``attn_up_blocks``: SD1/SD2 (1, 2, 3), SDXL (0, 1)), else at ``.1``."""
    for ldm, diff in TOP.items():
        if path == diff or path.startswith(diff + "."):
            return ldm + path[len(diff):]
    parts = path.split(".")
    if len(parts) < 3 or not parts[1].isdigit() and parts[0] != "mid_block":
        return None
    if parts[0] == "mid_block" and len(parts) > 2 and parts[2].isdigit():
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "attentions" and j == 0:
            return f"middle_block.1.{rest}"
        mapped = _resnet_ldm(rest) if kind == "resnets" else None
        return None if mapped is None else f"middle_block.{2 * j}.{mapped}"
    if len(parts) < 4 or not parts[3].isdigit():
        return None
    head, i, kind, j, rest = parts[0], int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    if head == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{3 * i + 3}.0.op" + rest[len("conv"):] if rest.split(".")[0] == "conv" else None
        return _ldm_layer(f"input_blocks.{3 * i + j + 1}", kind, rest)
    if head == "up_blocks":
        if kind == "upsamplers":
            sub = 2 if i in attn_up_blocks else 1
            return f"output_blocks.{3 * i + 2}.{sub}.conv" + rest[len("conv"):] if rest.split(".")[0] == "conv" \
                else None
        return _ldm_layer(f"output_blocks.{3 * i + j}", kind, rest)
    return None


def _resnet_ldm(rest: str) -> str | None:
    for ldm, diff in RESNET.items():
        if rest == diff or rest.startswith(diff + "."):
            return ldm + rest[len(diff):]
    return None


def _ldm_layer(prefix: str, kind: str, rest: str) -> str | None:
    if kind == "resnets":
        mapped = _resnet_ldm(rest)
        return None if mapped is None else f"{prefix}.0.{mapped}"
    return f"{prefix}.1.{rest}" if kind == "attentions" and rest.split(".", 1)[0] in _ATTN_FIRST else None
