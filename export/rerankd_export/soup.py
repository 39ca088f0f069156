"""Average the weights of cross-encoder checkpoints fine-tuned from the same base (a "model soup",
Wortsman et al., 2022): one model, the inference cost of one, usually better than each
ingredient. ``python -m rerankd_export.soup OUT IN1 IN2 [...]``.

Every ingredient must have the same architecture and tensor names. Weights are averaged in fp32
and stored as fp16 like the trainer's checkpoints; ``config.json``, the tokenizer files and the
model card come from the first ingredient, and the recipe records every ingredient's recipe.
Whether a soup helps is for a held-out set to say (``quick_eval --holdout`` on soups of
checkpoints trained with ``--holdout-queries``), not for the test split. Measured for the shipped
recipe (``scripts/gpu_train_reranker.sh`` MODE=soup, H100, 100 held-out SciFact train claims):
seed 42 NDCG@10 0.7891, seed 43 0.7925, their soup 0.7806 -- worse than either, so the shipped
checkpoint is a single run.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Sequence

COPY = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "README.md")


def soup(out: Path, ingredients: Sequence[Path]) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    if len(ingredients) < 2:
        raise ValueError("a soup needs at least two checkpoints")
    states = [load_file(str(Path(p) / "model.safetensors")) for p in ingredients]
    keys = set(states[0])
    for p, st in zip(ingredients[1:], states[1:]):
        if set(st) != keys:
            raise ValueError(f"{p}: tensor names differ from {ingredients[0]}")
        for k in keys:
            if st[k].shape != states[0][k].shape:
                raise ValueError(f"{p}: {k} has shape {tuple(st[k].shape)}, not {tuple(states[0][k].shape)}")
    avg = {}
    for k in sorted(keys):
        t0 = states[0][k]
        if t0.is_floating_point():
            mean = torch.stack([st[k].float() for st in states]).mean(0)
            avg[k] = mean.to(torch.float16).contiguous()
        else:  # integer buffers (position ids) must agree
            if any(not torch.equal(st[k], t0) for st in states[1:]):
                raise ValueError(f"non-float tensor {k} differs between checkpoints")
            avg[k] = t0.contiguous()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(avg, str(out / "model.safetensors"), metadata={"format": "pt"})
    first = Path(ingredients[0])
    for name in COPY:
        if (first / name).is_file():
            shutil.copyfile(first / name, out / name)
    cfg = json.loads((first / "config.json").read_text(encoding="utf-8"))
    recipes = []
    for p in ingredients:
        r = json.loads((Path(p) / "config.json").read_text(encoding="utf-8")).get("rerankd") or {}
        recipes.append({k: v for k, v in r.items() if k not in ("loss_curve", "eval")})
    r0 = dict(cfg.get("rerankd") or {})
    r0.pop("eval", None)
    r0["soup"] = {"method": "uniform weight average (fp32), stored fp16",
                  "ingredients": [str(p) for p in ingredients], "recipes": recipes}
    cfg["rerankd"] = r0
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rerankd_export.soup", description=__doc__.split("\n\n")[0])
    p.add_argument("output", type=Path)
    p.add_argument("ingredients", type=Path, nargs="+")
    a = p.parse_args(argv)
    soup(a.output, a.ingredients)
    print(f"wrote {a.output} (average of {len(a.ingredients)} checkpoints)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
