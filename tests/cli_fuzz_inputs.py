"""The inputs of the CLI fuzz harness (``cli_fuzz.py``): one workspace folder, built once, holding every kind of
file and path a command can be given — good ones (so a valid run is cheap: tiny models, the demo model's LoRAs)
and bad ones: missing, a folder, a FIFO, a socket, a character device (as root: a copy of /dev/null's numbers,
made here, so the machine's own is never at stake), a symlink loop, a symlink leading outside, a path under a
file, a path under /proc; truncated, empty, binary, sparse-huge and deeply nested files; mutated LoRA files
(``file_mutations``); jobs, options, prompts and caption files with bad JSON, NaN, surrogates, NULs; FLUX.1 LoRAs,
a tiny FLUX.1 folder, BFL single files and GGUF files, good and bad (``cli_fuzz_flux``); SD3, Chroma and
Qwen-Image folders and LoRAs, fp8 and broken quantized files (``cli_fuzz_dits``).

``Workspace.specials`` are the non-regular paths whose identity (inode, type, device numbers) the harness checks
after every case: a command that replaced one is a finding."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import stat
from pathlib import Path

import torch
from PIL import Image

from lorakit.files.io import save_file

from .conftest import REAL_LORAS, ROOT
from .factories import make_kohya_lora, tiny_components, tiny_sd1_pipeline
from .file_mutations import make_case

DEMO_LORAS = ROOT / "examples" / "loras"
DEEP = "[" * 50_000 + "]" * 50_000
Identity = tuple[int, int, int]


class Workspace:
    """Everything the commands are given, under ``root``; ``fresh(suffix)`` is a new output path each call."""

    def __init__(self, root: Path, mutated: int = 12) -> None:
        self.root = root
        self._n = 0
        for sub in ("in", "out", "special", "data", "models"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.outside = _write(self._dir("outside") / "secret.txt", b"outside text")
        self.specials = self._specials()
        pipe = tiny_sd1_pipeline()
        self.models = self._models(pipe)
        self.loras = self._loras(mutated, {"unet": pipe.unet, "text_encoder": pipe.text_encoder})  # type: ignore[attr-defined]
        self.texts = self._texts()
        self.data = self._data()
        self.folders = {"loras": DEMO_LORAS, "empty": self._dir("in/empty"), "file": self.loras["good"],
                        "outside": self.outside.parent, "missing": root / "in/no-such-folder",
                        "specials": root / "special", **{  # a folder holding a FIFO, a socket, a symlink loop
                            k: v for k, v in self.specials.items() if k in ("fifo", "loop", "dir", "link_out")}}
        self._flux()
        self._dits()

    def fresh(self, suffix: str = ".safetensors") -> Path:
        self._n += 1
        return self.root / "out" / f"o{self._n}{suffix}"

    def existing_copy(self) -> Path:
        """A new output path where a regular file already is (a copy of a LoRA: replacing it is fine)."""
        path = self.fresh()
        shutil.copyfile(self.loras["good"], path)
        return path

    def value(self, text: str) -> str:
        """``text`` with its tokens replaced: ``{lora:good}``, ``{model:base}``, ``{data:good}``, ``{text:image}``,
        ``{folder:loras}`` name workspace files; ``{fresh:.png}`` is a new output path (``{fresh:}`` a folder)."""
        tables = {"lora": self.loras, "model": self.models, "data": self.data, "text": self.texts,
                  "folder": self.folders}

        def one(m: re.Match[str]) -> str:
            kind, key = m.group(1), m.group(2)
            return str(self.fresh(key) if kind == "fresh" else tables[kind][key])

        return re.sub(r"\{(\w+):([^}]*)\}", one, text)

    def identities(self) -> dict[Path, Identity]:
        """The special paths' identities, and the outside file's (a symlink to a regular file may be replaced by
        an output — it is not special — but what it points at must never change)."""
        out = {p: identity(p) for k, p in self.specials.items() if k != "link_out" and os.path.lexists(p)}
        return out | {self.outside: (*identity(self.outside)[:2], hash(self.outside.read_bytes()))}

    def repair(self) -> None:
        """Put back a special path a command replaced (so the next cases meet it again)."""
        for p in list(self.specials.values()):
            if os.path.lexists(p):
                p.unlink() if not p.is_dir() or p.is_symlink() else shutil.rmtree(p)
        self.specials = self._specials()

    def _dir(self, rel: str) -> Path:
        (self.root / rel).mkdir(parents=True, exist_ok=True)
        return self.root / rel

    def _specials(self) -> dict[str, Path]:
        d = self.root / "special"
        out = {"fifo": d / "fifo", "socket": d / "sock", "dir": d / "dir", "loop": d / "loop",
               "link_fifo": d / "link_fifo", "link_out": d / "link_out"}
        os.mkfifo(out["fifo"])
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(out["socket"]))
        s.close()  # the socket file stays
        out["dir"].mkdir()
        out["loop"].symlink_to(out["loop"])
        out["link_fifo"].symlink_to(out["fifo"])
        out["link_out"].symlink_to(self.outside)
        if os.geteuid() == 0:
            out["device"] = d / "null"
            os.mknod(out["device"], 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        return out

    def _loras(self, mutated: int, fits: dict[str, torch.nn.Module]) -> dict[str, Path]:
        d = self.root / "in"
        good = d / "good.safetensors"
        save_file(make_kohya_lora(tiny_components("sd1"), "lora", rank=2), good)
        save_file(make_kohya_lora(fits, "lora", rank=2, seed=1), d / "fits.safetensors")  # the tiny models' layers
        raw = good.read_bytes()
        out = {"good": good, "fits": d / "fits.safetensors", "demo": DEMO_LORAS / "demo_style.safetensors", "lokr": DEMO_LORAS / "sunset_lokr.safetensors",
               "sd1": REAL_LORAS / "diffusers_attnprocs_sd15_pokemon.safetensors",
               "pickle": REAL_LORAS / "diffusers_attnprocs_sd15_catundchat.bin"}
        out["truncated"] = _write(d / "truncated.safetensors", raw[:len(raw) // 2])
        out["empty"] = _write(d / "empty.safetensors", b"")
        out["binary"] = _write(d / "binary.safetensors", random.Random(0).randbytes(4096))
        header = json.dumps({"__metadata__": {"x": "\\" * 200_000}, "a": DEEP}).encode()
        out["deep"] = _write(d / "deep.safetensors", len(header).to_bytes(8, "little") + header)
        out["huge"] = _sparse(d / "huge.safetensors", 3 << 30, prefix=(90 << 20).to_bytes(8, "little") + b"{")
        out["nan"] = d / "nan.safetensors"
        sd = make_kohya_lora(tiny_components("sd1"), "lora", rank=2)
        save_file({k: v.fill_(float("nan")) if "up" in k else v for k, v in sd.items()}, out["nan"])
        for i in range(mutated):
            out[f"mutated{i}"] = make_case(random.Random(i), d, f"mutated{i}")
        return out

    def _models(self, pipe: object) -> dict[str, Path]:
        from lorakit.tools.checkpoint import to_checkpoint

        d = self.root / "models"
        out = {"base": d / "base.safetensors", "tuned": d / "tuned.safetensors", "nan": d / "nan.safetensors",
               "folder": d / "folder"}
        save_file(to_checkpoint(pipe, "sd1"), out["base"])
        pipe.save_pretrained(out["folder"])  # type: ignore[attr-defined]
        weight = pipe.unet.down_blocks[0].attentions[0].proj_in.weight  # type: ignore[attr-defined]
        original = weight.detach().clone()
        with torch.no_grad():
            weight.add_(0.05 * torch.randn_like(weight))
            save_file(to_checkpoint(pipe, "sd1"), out["tuned"])
            weight[0, 0] = float("nan")
            save_file(to_checkpoint(pipe, "sd1"), out["nan"])
            weight.copy_(original)
        return out

    def _flux(self) -> None:
        """FLUX.1 inputs (``flux_inputs``): LoRAs and models added to ``loras``/``models``."""
        from .cli_fuzz_flux import flux_inputs

        loras, models = flux_inputs(self.root / "flux")
        self.loras.update(loras)
        self.models.update(models)
        self.folders["flux_loras"] = loras["flux"].parent

    def _dits(self) -> None:
        """SD3, Chroma, Qwen-Image and quantized inputs (``cli_fuzz_dits``), added to the tables."""
        from .cli_fuzz_dits import dit_inputs, quant_inputs

        made = dit_inputs(self.root / "dits")
        self.loras.update(made["loras"])
        self.models.update(made["models"])
        self.folders.update(made["folders"])
        self.texts.update(made["texts"])
        self.models.update(quant_inputs(self.root / "quant", self.models["flux_bfl"], self.models["flux_gguf"]))

    def _texts(self) -> dict[str, Path]:
        d = self.root / "in"
        lines = {
            "jobs_good": '{"prompt": "a red circle", "steps": 1, "width": 64, "height": 64, "seed": 1}\n',
            "jobs_lora": '{"prompt": "a circle <lora:demo_style:0.5>", "steps": 1, "width": 64, "height": 64}\n',
            "jobs_deep": '{"prompt": "a", "x": ' + DEEP + "}\n",
            "jobs_nan": '{"prompt": "a", "cfg_scale": NaN, "steps": 1}\n',
            "jobs_types": '{"prompt": 5, "steps": "x"}\n[1, 2]\n"s"\n',
            "jobs_surrogate": '{"prompt": "\\ud800", "steps": 1}\n',
            "jobs_huge_numbers": '{"prompt": "a", "steps": 1' + "0" * 5000 + ', "seed": 1e400}\n',
            "jobs_bad_lora": '{"prompt": "<lora:no_such:1>", "steps": 1}\n',
            "jobs_flux": '{"prompt": "a cat <lora:flux_style:0.5>", "steps": 1, "width": 64, "height": 64, '
                         '"distilled_cfg_scale": 3.5}\n',
            "jobs_flux_guidance": '{"prompt": "a", "steps": 1, "distilled_cfg_scale": 1e308}\n',
            "options_deep": '{"a": ' + DEEP + "}",
            "options_good": '{"CLIP_stop_at_last_layers": 1}',
            "prompts_good": "a red circle\n# a comment\na blue square <lora:demo_style:0.5>\n",
            "prompts_tags": "<lora:demo_style:nan>\n<lora:\n<lora:demo_style:1e308>\n",
        }
        out = {k: _write(d / f"{k}.{'jsonl' if k.startswith('jobs') else 'json' if 'options' in k else 'txt'}",
                         v.encode()) for k, v in lines.items()}
        out["binary_text"] = _write(d / "binary.txt", random.Random(1).randbytes(2048))
        out["nul_text"] = _write(d / "nul.txt", b"\0" * 1000)
        out["huge_text"] = _sparse(d / "huge.jsonl", 3 << 30)
        out["image"] = d / "image.png"
        Image.new("RGB", (64, 64), (200, 30, 30)).save(out["image"])
        out["huge_image"] = _write(d / "huge.png", _png_claiming(60_000, 60_000))
        return out

    def _data(self) -> dict[str, Path]:
        """Training folders: a good one, then one defect each."""
        out = {name: self._dir(f"data/{name}") for name in ("good", "nul", "big", "outside", "loop", "empty",
                                                            "self_loop")}
        for name, folder in out.items():
            if name == "empty":
                continue
            for i in range(2):
                Image.new("RGB", (64, 64), (40 * i, 200, 30)).save(folder / f"img{i}.png")
                (folder / f"img{i}.txt").write_text("a green circle")
        _write(out["nul"] / "img0.txt", b"\0" * 64)
        _sparse(out["big"] / "img1.txt", 3 << 30)
        (out["outside"] / "img2.png").symlink_to(self.root / "in" / "image.png")
        (out["loop"] / "10_again").symlink_to(out["loop"])
        (out["self_loop"] / "self").symlink_to(out["self_loop"] / "self")  # ELOOP when followed
        return out


def identity(path: Path) -> Identity:
    st = os.lstat(path)
    return st.st_ino, st.st_mode, st.st_rdev


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _sparse(path: Path, size: int, prefix: bytes = b"") -> Path:
    """A file of ``size`` bytes that takes no disk space (all zeros after ``prefix``)."""
    with path.open("wb") as f:
        f.write(prefix)
        f.truncate(size)
    return path


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` × ``height`` pixels (a decompression bomb's header)."""
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)
