"""Model families as data: what each one's LoRA files are named like, which components its models have, and how a
file's module names become the model's (``Family``); and which family a file is for (``detect``).

A family is one entry of ``FAMILIES`` plus its tables (``keymap/flux.py`` for FLUX.1, ``keymap/sd3.py`` for SD3).
The dialect readers (``formats/``) ask the family for component names and the flattened-name vocabulary;
``lora_model`` asks it to map an original-layout module (BFL's fused ``qkv``) onto the model's modules, and, for a
family of several sizes, which size a file is; the tools ask it for the way back (``layout``) and for the names its
files are written with. Families lorakit does not apply yet are named (``UNSUPPORTED``) so a file for one is refused
with its name, never read as something else.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from typing import Any

from . import chroma, flux, qwen, sd3
from .arch import Arch
from .arch import fits as archmod_fits
from .blocks import SD_VECTORS, SDXL_VECTORS, BlockVector
from .layouts import LayoutMap, SingleFile, Target
from .names import SD_VOCABULARY, Vocabulary


class Shaped(Protocol):
    @property
    def shape(self) -> tuple[int, ...]: ...


class Sizes(Protocol):
    """Which architecture (size) of a family a LoRA or a model is, for families whose sizes do not fit each other
    (SD3-Medium, 3.5-Medium, 3.5-Large)."""

    def of_layers(self, layers: Mapping[str, Any], metadata: Mapping[str, str]) -> str: ...

    def of_header(self, body: str, metadata: Mapping[str, str]) -> str: ...

    def of_model(self, components: Mapping[str, Any]) -> str: ...


@dataclass(frozen=True)
class Family:
    """``denoiser``: the canonical component of the UNet/transformer; ``kohya``: kohya/LyCORIS key prefixes →
    component (``None``: decided by the path's head, LyCORIS' own wrapper); ``peft``/``comfy``: the prefixes of
    PEFT/diffusers and ComfyUI keys → component; ``to_model``: an original-layout module path → the model's
    module(s) (``None`` when the family's files use the model's names); ``arch``: the architecture its LoRAs fit
    (``None``: decided from shapes, as SD1/SD2/SDXL, or by ``sizes``); ``layout``: the original layout both ways
    (writers); ``kohya_out``/``comfy_out``: the key prefixes its kohya / ComfyUI files are written with, per
    component (the denoiser's original-layout modules under ``lora_unet_``, others as OneTrainer names them);
    ``plain_te``: text encoders without a ``text_model`` level (T5); ``modelspec``: per architecture, kohya's
    ``ss_base_model_version`` and ``modelspec.architecture`` (without ``/lora``). ``fits``: the architectures of
    other families whose LoRAs its models take (their layers without a module here reported, not applied), with
    ``fitted_components`` renaming their components to its own (FLUX.1's T5 ``text_encoder_2`` is Chroma's
    ``text_encoder``); ``pipelines``: the diffusers pipeline classes of its model folders (``model_index.json``);
    ``dit_blocks``: the block-weight parts its transformer has (``double``: ``transformer_blocks``, ``single``:
    ``single_transformer_blocks``; ``patch.weights``); ``lbw``: per architecture (``*``: the family's others), the
    lora-block-weight vectors its models take (``block_vectors``); ``model_files``: the module of ``lorakit.tools``
    that reads its model folders and single files for ``bake``/``extract`` (``tools.modelfile.open_model``);
    ``single_file``: how its single-file checkpoints hold the transformer (``tools/dit_modelfile.py`` reads them for
    every DiT family, ``models/folder_dits.py`` loads those of the families without a model module of their own)."""

    key: str
    display: str
    denoiser: str
    encoders: Mapping[str, str]
    vocabulary: Vocabulary
    kohya: Mapping[str, str | None]
    peft: Mapping[str, str]
    comfy: Mapping[str, str]
    arch: Arch | None = None
    to_model: Callable[[str], Target | None] | None = None
    is_original: Callable[[str], bool] = field(default=lambda path: False)
    model_classes: tuple[str, ...] = ()
    hidden_outputs: tuple[str, ...] = ()  # model module paths ending so write the hidden state (its width)
    expandable: Mapping[str, str] = field(default_factory=dict)  # input layer → config key widened with it
    sizes: Sizes | None = None
    layout: LayoutMap | None = None
    kohya_out: Mapping[str, str] = field(default_factory=dict)
    comfy_out: Mapping[str, str] = field(default_factory=dict)
    plain_te: tuple[str, ...] = ()
    modelspec: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    fits: tuple[Arch, ...] = ()
    fitted_components: Mapping[str, str] = field(default_factory=dict)
    pipelines: tuple[str, ...] = ()
    dit_blocks: tuple[str, ...] = ()
    lbw: Mapping[str, tuple[BlockVector, ...]] = field(default_factory=dict)
    model_files: str | None = None
    single_file: SingleFile | None = None


SD = Family(
    "sd", "Stable Diffusion", "unet", {"text_encoder": "CLIP", "text_encoder_2": "OpenCLIP-G"}, SD_VOCABULARY,
    kohya={"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te_": "text_encoder",
           "lora_unet_": "unet", "oft_unet_": "unet", "oft_te_": "text_encoder", "lycoris_": None},
    peft={"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2",
          "base_model.model.": "unet", "diffusion_model.": "unet"},
    comfy={"clip_l": "text_encoder", "clip_h": "text_encoder", "clip_g": "text_encoder_2"},
    model_classes=("UNet2DConditionModel",),
    modelspec={Arch.SD1: ("sd_v1", "stable-diffusion-v1"), Arch.SD2: ("sd_v2", "stable-diffusion-v2"),
               Arch.SDXL: ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base")},
    lbw={"*": SD_VECTORS, Arch.SDXL: SDXL_VECTORS}, model_files="sd_modelfile")

FLUX1 = Family(
    "flux1", "FLUX.1", "transformer", {"text_encoder": "CLIP-L", "text_encoder_2": "T5-XXL"}, flux.VOCABULARY,
    # T5 is lora_te3_ in kohya and lora_te2_ in OneTrainer (FLUX has no second CLIP): both the T5 encoder
    kohya={"lora_transformer_": "transformer", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
           "lora_te3_": "text_encoder_2", "lora_te_": "text_encoder", "lora_unet_": "transformer",
           "lycoris_": "transformer"},
    peft={"transformer.base_model.model.": "transformer", "transformer.": "transformer",
          "base_model.model.": "transformer", "diffusion_model.": "transformer", "text_encoder.": "text_encoder",
          "text_encoder_2.": "text_encoder_2", "text_encoders.clip_l.transformer.": "text_encoder",
          "text_encoders.t5xxl.transformer.": "text_encoder_2"},  # the last two: ComfyUI's names
    comfy={"clip_l": "text_encoder", "t5xxl": "text_encoder_2"},
    arch=Arch.FLUX1, to_model=flux.to_model, is_original=flux.is_bfl_path,
    model_classes=("FluxTransformer2DModel",), hidden_outputs=flux.HIDDEN_OUTPUTS,
    expandable={"x_embedder": "in_channels"},  # control LoRAs (Canny/Depth) read the control image's latents too
    layout=flux.MAP, kohya_out={"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"},
    comfy_out={"transformer": "diffusion_model.", "text_encoder": "text_encoders.clip_l.transformer.text_model.",
               "text_encoder_2": "text_encoders.t5xxl.transformer."},
    plain_te=("text_encoder_2",), modelspec={Arch.FLUX1: ("flux1", "flux-1")}, dit_blocks=("double", "single"),
    lbw={"*": (flux.LBW,)}, model_files="flux_modelfile", single_file=flux.SINGLE_FILE)

SD3 = Family(
    "sd3", "Stable Diffusion 3", "transformer",
    {"text_encoder": "CLIP-L", "text_encoder_2": "OpenCLIP-G", "text_encoder_3": "T5-XXL"}, sd3.VOCABULARY,
    kohya={"lora_unet_": "transformer", "lora_transformer_": "transformer", "lora_te1_": "text_encoder",
           "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3", "lycoris_": "transformer"},
    peft={"transformer.base_model.model.": "transformer", "transformer.": "transformer",
          "base_model.model.": "transformer", "diffusion_model.": "transformer", "text_encoder.": "text_encoder",
          "text_encoder_2.": "text_encoder_2", "text_encoder_3.": "text_encoder_3",
          "text_encoders.clip_l.transformer.": "text_encoder", "text_encoders.clip_g.transformer.": "text_encoder_2",
          "text_encoders.t5xxl.transformer.": "text_encoder_3"},
    comfy={"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"},
    to_model=sd3.MAP.to_model, is_original=sd3.MAP.is_original, model_classes=("SD3Transformer2DModel",),
    hidden_outputs=sd3.HIDDEN_OUTPUTS, sizes=sd3.SIZES, layout=sd3.MAP,
    kohya_out={"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"},
    comfy_out={"transformer": "diffusion_model.", "text_encoder": "text_encoders.clip_l.transformer.text_model.",
               "text_encoder_2": "text_encoders.clip_g.transformer.text_model.",
               "text_encoder_3": "text_encoders.t5xxl.transformer."},
    plain_te=("text_encoder_3",),
    modelspec={Arch.SD3_MEDIUM: ("sd3-medium", "stable-diffusion-3-medium"),
               Arch.SD35_MEDIUM: ("sd3.5-medium", "stable-diffusion-3-5-medium"),
               Arch.SD35_LARGE: ("sd3.5-large", "stable-diffusion-3-5-large"),
               Arch.SD3_MEDIUMS: ("sd3", "stable-diffusion-3"), Arch.SD3: ("sd3", "stable-diffusion-3")},
    model_files="sd3_modelfile", single_file=sd3.SINGLE_FILE)

CHROMA = Family(
    "chroma", "Chroma", "transformer", {"text_encoder": "T5-XXL"}, chroma.VOCABULARY,
    kohya={"lora_transformer_": "transformer", "lora_unet_": "transformer", "lycoris_": "transformer",
           "lora_te3_": "text_encoder", "lora_te2_": "text_encoder", "lora_te_": "text_encoder"},  # T5, its only one
    peft={"transformer.base_model.model.": "transformer", "transformer.": "transformer",
          "base_model.model.": "transformer", "diffusion_model.": "transformer", "text_encoder.": "text_encoder",
          "text_encoders.t5xxl.transformer.": "text_encoder"},
    comfy={"t5xxl": "text_encoder"}, arch=Arch.CHROMA, to_model=chroma.MAP.to_model, is_original=chroma.MAP.is_original,
    model_classes=("ChromaTransformer2DModel",), hidden_outputs=flux.HIDDEN_OUTPUTS, layout=chroma.MAP,
    kohya_out={"text_encoder": "lora_te3_"},
    comfy_out={"transformer": "diffusion_model.", "text_encoder": "text_encoders.t5xxl.transformer."},
    plain_te=("text_encoder",), modelspec={Arch.CHROMA: ("chroma", "chroma")}, fits=(Arch.FLUX1,),
    fitted_components={"text_encoder_2": "text_encoder"}, pipelines=("ChromaPipeline", "ChromaImg2ImgPipeline"),
    dit_blocks=("double", "single"), lbw={"*": (flux.LBW,)}, model_files="dit_modelfile",
    single_file=chroma.SINGLE_FILE)

QWEN_IMAGE = Family(
    "qwen-image", "Qwen-Image", "transformer", {"text_encoder": "Qwen2.5-VL"}, qwen.VOCABULARY,
    kohya={"lora_unet_": "transformer", "lora_transformer_": "transformer", "lycoris_": "transformer"},
    peft={"transformer.base_model.model.": "transformer", "transformer.": "transformer",
          "base_model.model.": "transformer", "diffusion_model.": "transformer", "text_encoder.": "text_encoder"},
    comfy={"qwen25_7b": "text_encoder"}, arch=Arch.QWEN_IMAGE, model_classes=("QwenImageTransformer2DModel",),
    kohya_out={"transformer": "lora_unet_"},  # musubi-tuner's names (its transformer has no original layout)
    plain_te=("text_encoder",), modelspec={Arch.QWEN_IMAGE: ("qwen_image", "Qwen-Image")},
    pipelines=("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline"), dit_blocks=("double",),
    model_files="dit_modelfile", single_file=qwen.SINGLE_FILE)

FAMILIES: dict[str, Family] = {f.key: f for f in (SD, FLUX1, SD3, CHROMA, QWEN_IMAGE)}

# Families lorakit does not apply (yet), by raw key names; tried after FLUX.1's own markers fail.
UNSUPPORTED: list[tuple[str, re.Pattern[str]]] = [
    ("HiDream", re.compile(r"double_stream_blocks")),
    ("AuraFlow", re.compile(r"joint_transformer_blocks")),
    ("Lumina 2", re.compile(r"noise_refiner|context_refiner|(?:^|[._])layers[._]\d+[._]attention[._]qkv")),
    ("Wan", re.compile(r"(?:^|[._])blocks[._]\d+[._](?:self_attn|cross_attn|ffn)[._]")),
    ("a transformer (DiT) model such as SD3, PixArt or Hunyuan", re.compile(r"^(lora_)?transformer[._]")),
]
_META: dict[str, str] = {"flux-2": "FLUX.2", "flux.2": "FLUX.2", "flux2": "FLUX.2", "chroma": "chroma",
                         "sd3": "sd3", "stable-diffusion-3": "sd3", "stable-diffusion-v3": "sd3", "qwen": "qwen-image",
                         "pixart": "PixArt",
                         "hunyuan": "Hunyuan", "auraflow": "AuraFlow", "cascade": "Stable Cascade",
                         "flux": "flux1"}
# A DiT's top-level ``transformer_blocks`` (FLUX.1's double blocks, SD3's joint blocks) under any dialect's prefix;
# an SD UNet's ``transformer_blocks`` sit inside ``attentions``, never at the top.
_DIFFUSERS_DOUBLE = re.compile(r"^(?:transformer\.|lora_transformer_|base_model\.model\.|lycoris_|lora_unet_|"
                               r"diffusion_model\.)*transformer_blocks[._]\d+[._]")
SD3_WIDTHS = tuple(sd3.WIDTHS)
# FLUX.1 (dev, schnell, Kontext) has 19 double blocks: a diffusers-layout file naming a later top-level block is
# for a deeper DiT with the same names (Qwen-Image: 60 blocks of width 3072; SD3.5-Large: 38).
FLUX1_DOUBLE_BLOCKS = flux.DOUBLE_BLOCKS
SD35_LARGE_BLOCKS = 38  # SD3's deepest model: a block past it is Qwen-Image's
QWEN_WIDTH = 3072  # Qwen-Image's hidden width (SD3's are SD3_WIDTHS)
_BLOCK_KEY = re.compile(r'"([^"]*?transformer_blocks[._](\d+)[._][^"]*)"')


def detect(keys: list[str], metadata: Mapping[str, str], shapes: Mapping[str, Shaped] | None = None) -> Family | str:
    """The family a LoRA file is for, or the name of one lorakit does not apply: keys first, then the input widths
    of a few layers, then metadata (``modelspec.architecture``, ``ss_base_model_version``), which is often stale —
    it decides only where the keys fit several families (``_Guess``), or none."""
    named = _by_keys(keys, shapes or {})
    meta = _by_metadata(metadata)
    if isinstance(named, _Guess):
        if meta is SD3 and named.default is FLUX1 and _unsettled_double_blocks(keys, shapes or {}):
            return SD3  # diffusers-layout double blocks whose widths are no full-size model's: metadata decides
        return meta if meta is not None and meta in named.choices else named.default
    if named is not None:
        return named
    return meta or SD


def alternatives(keys: list[str], metadata: Mapping[str, str], shapes: Mapping[str, Shaped] | None = None
                 ) -> tuple[Arch, ...]:
    """The other architectures a file fits when neither its keys nor its metadata decide (diffusers-named double
    blocks only: FLUX.1's, Chroma's or Qwen-Image's first blocks): a model of one of them takes it, saying so."""
    named = _by_keys(keys, shapes or {})
    if not isinstance(named, _Guess) or _by_metadata(metadata) is not None:
        return ()
    return tuple(f.arch for f in named.choices if isinstance(f, Family) and f.arch is not None)


@dataclass(frozen=True)
class _Guess:
    """Keys that fit several families: metadata naming one of ``choices`` picks it, else ``default``."""

    default: Family | str
    choices: tuple[Family | str, ...]


def _by_metadata(metadata: Mapping[str, str]) -> Family | str | None:
    meta = " ".join(metadata.get(k, "") for k in ("ss_base_model_version", "modelspec.architecture")).lower()
    return next((FAMILIES.get(name, name) for marker, name in _META.items() if marker in meta), None)


def _by_keys(keys: list[str], shapes: Mapping[str, Shaped]) -> Family | str | _Guess | None:
    if any(flux.FLUX2.search(k) for k in keys) or _text_width(keys, shapes) in flux.FLUX2_TEXT_WIDTHS:
        return "FLUX.2"
    if any(flux.CHROMA.search(k) for k in keys):
        return CHROMA
    if any(qwen.KEYS.search(k) for k in keys):
        return QWEN_IMAGE
    if sd3.claims(keys):  # before FLUX.1's markers: SD3's final layer is named as FLUX's
        return SD3
    if any(flux.KEYS.search(k) for k in keys):  # Chroma's own files mostly carry FLUX.1's names only (kohya)
        return _Guess(FLUX1, (CHROMA,))
    doubles = [k for k in keys if _DIFFUSERS_DOUBLE.search(k)]
    if doubles:
        widths = _double_widths(doubles, shapes)
        if widths & set(SD3_WIDTHS):
            return SD3
        deepest = max(int(m[1]) for k in doubles if (m := re.search(r"transformer_blocks[._](\d+)", k)))
        if deepest < FLUX1_DOUBLE_BLOCKS and all(k.startswith("lora_unet_") for k in doubles):
            return _Guess(QWEN_IMAGE, (FLUX1, CHROMA))  # musubi-tuner's Qwen-Image names (kohya's FLUX.1: BFL ones)
        if deepest < FLUX1_DOUBLE_BLOCKS:  # FLUX.1's double blocks or the first blocks of a deeper DiT
            return _Guess(FLUX1, (CHROMA, QWEN_IMAGE))
        if deepest >= SD35_LARGE_BLOCKS or widths & {QWEN_WIDTH}:
            return QWEN_IMAGE
        return _Guess("Qwen-Image or Stable Diffusion 3", (QWEN_IMAGE,))
    for name, pattern in UNSUPPORTED:
        if any(pattern.search(k) for k in keys):
            return name
    return None


def _double_widths(doubles: list[str], shapes: Mapping[str, Shaped]) -> set[int]:
    """The input widths the factors of diffusers-layout double blocks show (LoRA's down, LoHa's ``w1_b``, LoKr's
    Kronecker factors: w1's columns × w2's)."""
    out: set[int] = set()
    for k in doubles:
        s = shapes.get(k)
        if s is None or len(s.shape) != 2:
            continue
        if re.search(r"lora_A|lora_down|down\.weight|hada_w1_b", k):
            out.add(int(s.shape[1]))
        elif k.endswith((".lokr_w1", ".lokr_w1_b")):
            base = k.rsplit(".", 1)[0]
            w2 = next((t for leaf in (".lokr_w2", ".lokr_w2_b") if (t := shapes.get(base + leaf)) is not None), None)
            if w2 is not None and len(w2.shape) == 2:
                out.add(int(s.shape[1]) * int(w2.shape[1]))
    return out


def _unsettled_double_blocks(keys: list[str], shapes: Mapping[str, Shaped]) -> bool:
    """Diffusers-layout double blocks whose widths are neither FLUX.1's (3072) nor SD3's (a tiny test model's, or
    none shown): FLUX.1 and SD3 files name them alike."""
    doubles = [k for k in keys if _DIFFUSERS_DOUBLE.search(k)]
    return bool(doubles) and not _double_widths(doubles, shapes) & {3072, *SD3_WIDTHS}


def depth_decides(keys: list[str], shapes: Mapping[str, Shaped] | None = None) -> bool:
    """Whether these keys are diffusers-layout DiT blocks only, whose family the deepest block index decides
    (FLUX.1's 19 double blocks or Qwen-Image's 60): a sample of a header's keys cannot say then (their widths may:
    SD3's)."""
    found = _by_keys(keys, shapes or {})
    return isinstance(found, _Guess) and QWEN_IMAGE in (found.default, *found.choices)


def deepest_block_keys(text: str) -> list[str]:
    """From a header's text (every key, in any order), the key of the deepest top-level ``transformer_blocks``
    block — what a sample of a header's keys may miss (safetensors sorts ``…blocks.9`` after ``…blocks.59``)."""
    best: tuple[int, str] | None = None
    for m in _BLOCK_KEY.finditer(text):
        if _DIFFUSERS_DOUBLE.search(m[1]) and (best is None or int(m[2]) > best[0]):
            best = (int(m[2]), m[1])
    return [] if best is None else [best[1]]


def block_vectors(arch: str) -> tuple[BlockVector, ...]:
    """The lora-block-weight vectors a model of ``arch`` takes (``Family.lbw``; none: a family without them)."""
    table = family_of_arch(arch).lbw
    return table.get(arch, table.get("*", ()))


def unet_vector(arch: str) -> BlockVector:
    """The longest UNet lbw vector of ``arch``'s family (SDXL's 20 values; SD1/SD2's 26 for every other model) and,
    from its last block, the UNet's last output block (``unet_last_out``)."""
    vectors = [v for v in block_vectors(arch) if v.blocks[-1].startswith("OUT")]
    return max(vectors, key=lambda v: len(v.blocks)) if vectors else all_block_vectors()[26]


def unet_last_out(arch: str) -> int:
    """The number of ``arch``'s last UNet output block (SDXL 8, SD1/SD2 11): ``block_id``'s ``last_out``."""
    return int(unet_vector(arch).blocks[-1][3:])


def all_block_vectors() -> dict[int, BlockVector]:
    """Every family's lbw vectors by length (the length tells a vector apart)."""
    return {len(v.blocks): v for f in FAMILIES.values() for vs in f.lbw.values() for v in vs}


def vector_takers(vector: BlockVector) -> str:
    """Who takes ``vector``: its label, and the families listing it after the first (``FLUX.1 and Chroma``)."""
    takers = [f.display for f in FAMILIES.values() if any(vector in vs for vs in f.lbw.values())]
    return " and ".join([vector.label, *takers[1:]])


def family_of_arch(arch: str) -> Family:
    """The family whose LoRAs an architecture names (Stable Diffusion for SD1/SD2/SDXL, the demo and unknown)."""
    return next((f for f in FAMILIES.values() if f.arch == arch or arch in f.modelspec), SD)


def _text_width(keys: list[str], shapes: Mapping[str, Shaped]) -> int | None:
    """The input width of the text embedder's LoRA (``txt_in``/``context_embedder`` down factor), if shown."""
    for k in keys:
        s = shapes.get(k)
        if s is not None and len(s.shape) == 2 and flux.TEXT_IN.search(k) and re.search(r"lora_A|lora_down", k):
            return int(s.shape[1])
    return None


def family_of_model(components: Mapping[str, object]) -> Family | None:
    """The family of a model's components by their classes (``None``: none of ours)."""
    names = {type(m).__name__ for m in components.values()}
    return next((f for f in FAMILIES.values() if names & set(f.model_classes)), None)


SUPPORTED = "Stable Diffusion 1.x, 2.x and XL, FLUX.1, Stable Diffusion 3 / 3.5, Chroma and Qwen-Image"


def by_pipeline(class_name: str) -> Family | None:
    """The family whose diffusers pipeline class a model folder's ``model_index.json`` names (``None``: none)."""
    return next((f for f in FAMILIES.values() if class_name in f.pipelines), None)


def fits(lora_arch: str, model_arch: str) -> bool:
    """Whether a LoRA made for ``lora_arch`` may be applied to a ``model_arch`` model: the same architecture, one
    that covers it, an unknown one (``arch.fits``), or one the model's family takes (``Family.fits``: FLUX.1 LoRAs
    on Chroma, their layers for what Chroma pruned reported as having no module). Chroma's own LoRAs do not fit
    FLUX.1: no family lists them."""
    return archmod_fits(lora_arch, model_arch) or lora_arch in family_of_arch(model_arch).fits
# FLUX.1 control and Fill LoRAs widen ``img_in`` to take the control image's (or the masked image's and the
# mask's) latents beside the noise: 64 → 128 (Canny, Depth) or 384 (Fill) input features at full size.
FLUX1_WIDE_INPUTS = {128: "flux-1-dev-control", 384: "flux-1-fill-dev"}
FLUX1_VARIANTS = ("flux-1-dev", "flux-1-schnell", *FLUX1_WIDE_INPUTS.values(), "flux-1")  # what ``variant`` tells


def variant(family: Family, keys: list[str], metadata: Mapping[str, str],
            shapes: Mapping[str, Shaped] | None = None) -> str | None:
    """The finer base of a FLUX.1 LoRA (``flux-1-dev``, ``flux-1-schnell``, ``flux-1-dev-control``,
    ``flux-1-fill-dev``, else ``flux-1``): metadata when it names one, else a widened ``img_in``, else guidance
    layers (schnell has none); ``None`` for other families (their arch says it all)."""
    if family is not FLUX1:
        return None
    named = variant_from_metadata(metadata)
    if named is not None:
        return named
    for k in keys:
        s = (shapes or {}).get(k)
        if s is not None and len(s.shape) == 2 and flux.IMG_IN.search(k) and re.search(r"lora_A|lora_down", k):
            wide = FLUX1_WIDE_INPUTS.get(int(s.shape[1]))
            if wide:
                return wide
    return "flux-1-dev" if any(flux.GUIDANCE.search(k) for k in keys) else "flux-1"


def variant_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The FLUX.1 variant ``modelspec.architecture`` names (``flux-1-dev/lora``, OneTrainer's ``Flux.1-fill-dev/lora``
    → ``flux-1-fill-dev``), or ``None`` when it names none (``flux-1/lora``: kohya's "unknown")."""
    spec = metadata.get("modelspec.architecture", "").split("/", 1)[0].strip().lower().replace(".", "-")
    return spec if spec.startswith("flux-1-") else None


def foreign_name(keys: list[str], metadata: Mapping[str, str]) -> str | None:
    """The display name of the family a file is for when it is not Stable Diffusion (``FLUX.1``, ``Chroma``…)."""
    found = detect(keys, metadata)
    if isinstance(found, str):
        return found
    return None if found is SD else found.display
