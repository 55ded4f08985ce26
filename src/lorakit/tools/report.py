"""What a tool did, layer by layer: kept ranks, the relative Frobenius error each layer costs (measured on the
factors as stored), the layers it left out and why, per-component totals and the worst layers — printed, and
stored compactly in the output's metadata (``lorakit.report``).

Per component c: err_c = √(Σ_l ‖ΔW_l − ΔW'_l‖²) / √(Σ_l ‖ΔW_l‖²) over its layers l.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LayerResult:
    path: str
    source: str  # what the layer was: "lora", "loha", "dora(lora)", "diff", …
    rank: int | None  # rank written (None: the layer is written as it was, or not low-rank)
    norm2: float  # ‖ΔW‖_F² of what it should be
    err2: float  # ‖ΔW − ΔW_written‖_F²
    note: str = ""

    @property
    def rel(self) -> float:
        return math.sqrt(self.err2 / self.norm2) if self.norm2 > 0 else (0.0 if self.err2 == 0 else math.inf)


@dataclass
class ToolReport:
    tool: str
    output: str | None
    layers: list[LayerResult] = field(default_factory=list)
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (what, why)
    notes: list[str] = field(default_factory=list)
    size_bytes: int | None = None
    size_before: int | None = None

    def add(self, layer: LayerResult) -> None:
        self.layers.append(layer)

    def leave_out(self, what: str, why: str) -> None:
        self.left_out.append((what, why))

    def per_component(self) -> dict[str, float]:
        sums: dict[str, list[float]] = {}
        for layer in self.layers:
            s = sums.setdefault(layer.path.split(".", 1)[0], [0.0, 0.0])
            s[0] += layer.err2
            s[1] += layer.norm2
        return {c: (math.sqrt(e / n) if n > 0 else 0.0) for c, (e, n) in sorted(sums.items())}

    def worst(self, n: int = 10) -> list[LayerResult]:
        return sorted((layer for layer in self.layers if layer.err2 > 0), key=lambda x: -x.rel)[:n]

    def ranks(self) -> list[int]:
        return sorted({layer.rank for layer in self.layers if layer.rank is not None})

    def text(self, worst: int = 5) -> str:
        where = f" → {self.output}" if self.output else " (dry run: nothing written)"
        lines = [f"lorakit {self.tool}{where}: {len(self.layers)} layers"]
        ranks = self.ranks()
        if ranks:
            lines[0] += f", ranks {ranks[0]}–{ranks[-1]}" if len(ranks) > 1 else f", rank {ranks[0]}"
        if self.size_bytes is not None:
            before = f" (was {_mb(self.size_before)})" if self.size_before else ""
            lines[0] += f", {_mb(self.size_bytes)}{before}"
        for component, err in self.per_component().items():
            lines.append(f"  {component:<15} relative error {_pct(err)}")
        bad = self.worst(worst)
        if bad:
            lines.append("  worst layers:")
            lines += [f"    {_pct(x.rel):>9}  {x.path} ({x.source}{', rank ' + str(x.rank) if x.rank else ''})"
                      f"{'  ' + x.note if x.note else ''}" for x in bad]
        lines += [f"  note: {n}" for n in self.notes]
        if self.left_out:
            lines.append(f"  left out ({len(self.left_out)}):")
            lines += [f"    {what}: {why}" for what, why in self.left_out[:20]]
            if len(self.left_out) > 20:
                lines.append(f"    … and {len(self.left_out) - 20} more (all in the file's lorakit.report)")
        return "\n".join(lines)

    def as_json(self, worst: int = 10) -> dict[str, Any]:
        return {"tool": self.tool, "layers": len(self.layers), "ranks": self.ranks(),
                "relative_error": {c: _round(e) for c, e in self.per_component().items()},
                "worst": [{"layer": x.path, "type": x.source, "rank": x.rank, "relative_error": _round(x.rel)}
                          for x in self.worst(worst)],
                "noted": sorted({x.path: x.note for x in self.layers if x.note}.items())[:200],
                "left_out": [{"what": w, "why": y} for w, y in self.left_out], "notes": self.notes}

    def metadata(self) -> dict[str, str]:
        return {"lorakit.report": json.dumps(self.as_json(), separators=(",", ":"))}


def _round(x: float) -> float:
    return float(f"{x:.6g}") if math.isfinite(x) else x


def _pct(x: float) -> str:
    if x == 0:
        return "0 (exact)"
    return f"{x * 100:.3g} %" if x >= 1e-4 else f"{x:.2e}"


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 2 ** 20:.1f} MiB"
