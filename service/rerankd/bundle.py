"""Read-only view of an exported model bundle (see docs/bundle-format.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

BUNDLE_FORMAT = "rerankd-bundle/1"


@dataclass(frozen=True)
class ModelBundle:
    path: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, models_dir: Path, name: str, task: str) -> "ModelBundle":
        path = Path(models_dir) / name
        mf = path / "manifest.json"
        if not mf.is_file():
            raise ConfigError(
                f"model bundle {name!r} not found at {path} (no manifest.json); "
                f"create it with `rerankd export --defaults --models-dir {models_dir}`"
            )
        try:
            manifest = json.loads(mf.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{mf}: unreadable manifest: {e}") from e
        if manifest.get("format") != BUNDLE_FORMAT:
            raise ConfigError(f"{mf}: format {manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}")
        if manifest.get("task") != task:
            raise ConfigError(f"{mf}: bundle {name!r} is a {manifest.get('task')!r} model, expected {task!r}")
        return cls(path=path, manifest=manifest)

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def max_length(self) -> int:
        return int(self.manifest["max_length"])

    @property
    def input_names(self) -> list[str]:
        return list(self.manifest["inputs"])

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest.get("files", {}).get("tokenizer", "tokenizer.json")

    @property
    def special_tokens(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.manifest["special_tokens"].items()}

    def variant_file(self, precision: str) -> Path:
        variants = self.manifest.get("variants", {})
        if precision not in variants:
            raise ConfigError(
                f"bundle {self.name!r} has no {precision!r} variant (has: {', '.join(sorted(variants))}); "
                f"re-export with the matching option (e.g. `rerankd export --int8`)"
            )
        f = self.path / variants[precision]["file"]
        if not f.is_file():
            raise ConfigError(f"bundle {self.name!r}: {f} is missing")
        return f
