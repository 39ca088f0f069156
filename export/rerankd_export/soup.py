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
checkpoint is a single run. Those two runs also started from different random heads (the head is
drawn from ``--seed``); ``train-reranker --init-seed`` lets runs share one.

``--greedy`` builds a *greedy* soup instead (Wortsman et al.'s recipe): ingredients sorted by their
held-out score, best first; each next one is kept only if the average with it scores higher on the
held-out claims than the soup without it. It never scores below its best ingredient on those
claims, so the held-out score alone cannot tell a soup from a lucky pick -- a separate test read
does. Every ingredient must have held out the very same claims (checked), or the score would be
read on claims an ingredient was trained on.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

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


def _recipe(model_dir: Path) -> dict:
    cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return cfg.get("rerankd") or {}


def greedy_soup(
    out: Path,
    ranked: Sequence[Path],
    evaluate: Callable[[Path], float],
    scores: dict | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
) -> tuple[list[Path], float, list[dict]]:
    """Greedy soup of ``ranked`` (best held-out score first) written to ``out``.

    ``evaluate(dir) -> score`` scores a checkpoint on the held-out claims (higher is better);
    ``scores`` holds the ingredients' own scores where already known. Returns the kept
    ingredients, the soup's score and the trace (one entry per ingredient tried).
    """
    ranked = [Path(p) for p in ranked]
    if not ranked:
        raise ValueError("a greedy soup needs at least one checkpoint")
    held = [sorted(str(q) for q in (_recipe(p).get("holdout_qids") or [])) for p in ranked]
    if not held[0]:
        raise ValueError(f"{ranked[0]} was trained without held-out claims: nothing to choose on")
    for p, h in zip(ranked[1:], held[1:]):
        if h != held[0]:
            raise ValueError(f"{p} held out other claims than {ranked[0]}: its score would be read "
                             "on claims the other was trained on")
    scores = {Path(k): v for k, v in (scores or {}).items()}
    out = Path(out)
    trial = out.with_name(out.name + ".try")
    best = scores[ranked[0]] if ranked[0] in scores else evaluate(ranked[0])
    kept = [ranked[0]]
    trace = [{"ingredient": str(ranked[0]), "score": best, "kept": True}]
    log(f"[soup] start {ranked[0]}: {best:.4f}")
    if out.exists():
        shutil.rmtree(out)
    for cand in ranked[1:]:
        if trial.exists():
            shutil.rmtree(trial)
        soup(trial, kept + [cand])
        s = evaluate(trial)
        keep = s > best
        trace.append({"ingredient": str(cand), "score": s, "kept": keep})
        log(f"[soup] + {cand}: {s:.4f} ({'kept' if keep else 'dropped'}; best so far {max(s, best):.4f})")
        if keep:
            kept.append(cand)
            best = s
            if out.exists():
                shutil.rmtree(out)
            trial.rename(out)
        else:
            shutil.rmtree(trial)
    if len(kept) == 1:  # nothing helped: the soup is the best ingredient itself
        shutil.copytree(ranked[0], out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    r = cfg.setdefault("rerankd", {})
    r.pop("eval", None)
    r.setdefault("soup", {"method": "single checkpoint (no ingredient raised the held-out score)",
                          "ingredients": [str(kept[0])]})
    r["soup"]["greedy"] = {"rule": "sorted by held-out NDCG@10, best first; an ingredient is kept "
                                   "if the average with it scores higher on the held-out claims",
                           "held_out_score": best, "trace": trace}
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return kept, best, trace


def holdout_ndcg(eval_args: Sequence[str]) -> Callable[[Path], float]:
    """``evaluate`` for :func:`greedy_soup`: quick_eval's reranked NDCG@10 on the held-out claims."""
    from . import quick_eval

    def evaluate(model_dir: Path) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            js = Path(tmp) / "r.json"
            with contextlib.redirect_stdout(io.StringIO()):
                rc = quick_eval.main(["--model", str(model_dir), "--split", "train", "--holdout",
                                      *eval_args, "--json", str(js)])
            if rc != 0:
                raise RuntimeError(f"quick_eval failed on {model_dir} (exit {rc})")
            return float(json.loads(js.read_text(encoding="utf-8"))["reranked"]["NDCG@10"])

    return evaluate


def _ingredient(arg: str) -> tuple[Path, float | None]:
    """DIR or DIR=SCORE; a directory whose own name holds '=' (runs/lr=2e-5) is a DIR."""
    path, sep, score = arg.rpartition("=")
    if not sep or Path(arg).is_dir():
        return Path(arg), None
    try:
        return Path(path), float(score)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ingredient {arg!r}: expected DIR or DIR=SCORE") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rerankd_export.soup", description=__doc__.split("\n\n")[0])
    p.add_argument("output", type=Path)
    p.add_argument("ingredients", type=_ingredient, nargs="+", metavar="DIR[=SCORE]",
                   help="checkpoints; with --greedy, DIR=SCORE gives a held-out score already measured")
    p.add_argument("--greedy", action="store_true",
                   help="greedy soup chosen on the checkpoints' held-out claims (quick_eval --holdout)")
    p.add_argument("--eval-args", default="", metavar="ARGS",
                   help="quick_eval arguments for --greedy, one string: --eval-args='--dataset D ...'")
    a = p.parse_args(argv)
    if not a.greedy:
        if any(s is not None for _, s in a.ingredients):
            p.error("DIR=SCORE is for --greedy")
        soup(a.output, [d for d, _ in a.ingredients])
        print(f"wrote {a.output} (average of {len(a.ingredients)} checkpoints)")
        return 0
    evaluate = holdout_ndcg(shlex.split(a.eval_args))
    scores = {d: s for d, s in a.ingredients if s is not None}
    for d, s in a.ingredients:
        if s is None:
            scores[d] = evaluate(d)
    ranked = sorted((d for d, _ in a.ingredients), key=lambda d: -scores[d])  # stable on ties
    kept, best, _ = greedy_soup(a.output, ranked, evaluate, scores)
    print(json.dumps({"output": str(a.output), "ingredients": [str(k) for k in kept], "held_out_ndcg10": best}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
