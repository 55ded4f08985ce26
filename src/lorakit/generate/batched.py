"""Requests with different LoRA sets in one UNet batch (mixed-LoRA serving): which requests may share a batch,
and each request's weight specs split into its text-encoder part and its UNet part.

A1111, ComfyUI and diffusers apply one LoRA set to a whole batch, so a server with requests for different LoRAs runs
them one after another. Here requests that share size, steps, sampler and CFG scale (``batch_key``) and whose
prompts encode to the same number of 75-token chunks sample together (``Generator.run_batch``): each request's
prompts are encoded with its own text-encoder LoRAs (hooks, one request at a time); one diffusers call then samples
every image with the UNet's LoRAs applied per sample (``patch.multi.MultiPatcher``: no weight changes); each
request's images are decoded together, as alone. Clip skip, prompts, seeds, batch sizes and LoRA weights (block
weights included) may differ. A request with a per-step schedule (``@`` in a tag, ``start``/``stop``) runs alone:
its UNet strengths move per step, which the batch does not share.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence

from ..lora_model import LoraModel
from .request import Job

DEFAULT_MAX_IMAGES = 8  # images (UNet batch rows before CFG doubles them) sampled together at most


def batch_key(job: Job) -> Hashable | None:
    """What requests must share to sample in one batch; ``None``: this one runs alone (per-step schedules,
    img2img)."""
    if job.request.init is not None or job.request.control is not None or any(ref.scheduled for ref in job.refs):
        return None
    s, req = job.settings, job.request
    return (s.steps, s.cfg, s.sampler, job.width, job.height)


def group_jobs(jobs: Sequence[Job | None], max_images: int = DEFAULT_MAX_IMAGES) -> list[list[int]]:
    """Indices of ``jobs`` grouped to sample together, in order of each group's first request: same
    ``batch_key``, at most ``max_images`` images a group (a request with more runs alone). ``None`` entries
    (requests that failed to resolve) are left out."""
    groups: list[list[int]] = []
    sizes: list[int] = []
    open_groups: dict[Hashable, int] = {}  # key → index of its group still taking requests
    for i, job in enumerate(jobs):
        if job is None:
            continue
        key, n = batch_key(job), job.request.batch
        g = open_groups.get(key) if key is not None else None
        if g is not None and sizes[g] + n <= max_images:
            groups[g].append(i)
            sizes[g] += n
            continue
        groups.append([i])
        sizes.append(n)
        if key is not None:
            open_groups[key] = len(groups) - 1
    return groups


def part_specs(job: Job, part: str) -> list[tuple[LoraModel, dict[str, object]]]:
    """The job's (LoRA, weight spec) pairs with only ``part`` (``te`` or ``unet``) on: the other part's strength
    is 0, so its layers get no hook."""
    other = "unet" if part == "te" else "te"
    return [(lora, {**ref.spec(None, job.settings.steps), other: 0.0}) for ref, lora in zip(job.refs, job.loras)]


def by_length(lengths: Sequence[int]) -> list[list[int]]:
    """Indices grouped by equal value, in order of first appearance (conditionings of one length share a batch)."""
    out: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        out.setdefault(n, []).append(i)
    return list(out.values())
