"""Model families as data: what each one's LoRA files are named like, which components its models have, and how a
file's module names become the model's (``Family``). Which family a file is for: ``keymap/detection.py``.

A family is one entry of ``FAMILIES`` plus its tables (``keymap/flux.py`` for FLUX.1, ``keymap/sd3.py`` for SD3).
The dialect readers (``formats/``) ask the family for component names and the flattened-name vocabulary;
``lora_model`` asks it to map an original-layout module (BFL's fused ``qkv``) onto the model's modules, and, for a
family of several sizes, which size a file is; the tools ask it for the way back (``layout``) and for the names its
files are written with.
"""
from __future__ import annotations

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
