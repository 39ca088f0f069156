"""Quick PyTorch evaluation of a cross-encoder checkpoint on a BEIR dataset.

Runs the hybrid first stage (dense all-MiniLM-L6-v2 exact cosine + BM25, RRF k=60 over
top-``depth`` legs by default, the same code the trainer mines negatives with; ``--rrf-k 20
--leg-depth 400`` approximates the server's rerank pool), reranks the top ``depth`` with the
cross-encoder and reports NDCG@10 / MRR@10 / P@5 (``ir_measures``) for the first stage and
the reranked run. This is evaluation, so it reads ``qrels/<split>.tsv`` (test by default).

    python -m rerankd_export.quick_eval --model checkpoints/rerankd-ce-MiniLM-L6 \
        --dataset /work/shared/datasets/scifact [--update-card]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np

from rerankd_export.train_reranker import (
    CARD_METRICS_END,
    CARD_METRICS_START,
    DEFAULT_CACHE,
    RRF_K,
    HybridRetriever,
    _machine,
    _progress,
    autocast,
    default_base_dir,
    load_corpus,
    load_qrels,
    load_queries,
    resolve_bf16,
    resolve_device,
    set_threads,
)

MEASURES = ("nDCG@10", "RR@10", "P@5")
LABELS = {"nDCG@10": "NDCG@10", "RR@10": "MRR@10", "P@5": "P@5"}


def _metrics(qrels: dict, run: dict) -> dict[str, float]:
    try:
        import ir_measures
    except ImportError:  # e.g. a bare GPU image: the service's metrics (tested against ir_measures)
        from rerankd import irmetrics

        m = irmetrics.evaluate({q: irmetrics.rank_by_score(r) for q, r in run.items()}, qrels)
        return {"NDCG@10": round(m["ndcg@10"], 4), "MRR@10": round(m["mrr@10"], 4), "P@5": round(m["p@5"], 4)}

    measures = [ir_measures.parse_measure(m) for m in MEASURES]
    agg = ir_measures.calc_aggregate(measures, qrels, run)
    return {LABELS[str(m)]: round(float(agg[m]), 4) for m in measures}


def score_pairs(
    model,
    tokenizer,
    pairs: list[tuple[str, str]],
    *,
    device: str = "cpu",
    bf16: bool = False,
    batch_size: int = 32,
    max_length: int = 256,
    desc: str = "rerank",
    resume: Path | None = None,
    stats: dict | None = None,
) -> np.ndarray:
    """Cross-encoder logits for (query, doc) pairs, batched by length.

    With ``resume`` (an ``.npz`` path), partial scores are saved every ~30 s and picked
    up again by a rerun with the same model/pairs (long CPU evaluations on a shared box).
    """
    import torch

    scores = np.zeros(len(pairs), dtype=np.float32)
    done = np.zeros(len(pairs), dtype=bool)
    if resume is not None and Path(resume).exists():
        with np.load(resume) as z:
            if z["scores"].shape == scores.shape:
                scores, done = z["scores"].copy(), z["done"].copy()

    def save() -> None:
        if resume is not None:
            Path(resume).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(str(resume) + ".tmp.npz")
            np.savez(tmp, scores=scores, done=done)
            os.replace(tmp, resume)

    order = np.argsort([-(len(q) + len(d)) for q, d in pairs], kind="stable")
    order = order[~done[order]]
    if stats is not None:
        stats["scored"] = len(order)
    bar = _progress(total=len(pairs), initial=int(done.sum()), desc=desc, unit="pair",
                    disable=len(pairs) < 256)
    last_save = time.time()
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            enc = tokenizer(
                [pairs[i][0] for i in idx],
                [pairs[i][1] for i in idx],
                truncation="only_second",
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            ).to(device)
            with autocast(device, bf16):
                logits = model(**enc).logits
            scores[idx] = logits.float()[:, 0].cpu().numpy()
            done[idx] = True
            bar.update(len(idx))
            if resume is not None and time.time() - last_save > 30:
                save()
                last_save = time.time()
    bar.close()
    save()
    return scores


def tail_window(tokenizer, query: str, title: str, text: str, max_length: int):
    """``(input_ids, token_type_ids)`` of a second window for a passage that the
    ``[CLS] query [SEP] title text [SEP]`` pair truncates at ``max_length``: the title and the
    *end* of the text (what truncation cut), same length budget. ``None`` when nothing was cut.
    """
    q = tokenizer(query, add_special_tokens=False)["input_ids"]
    t = tokenizer(title.strip(), add_special_tokens=False)["input_ids"] if title and title.strip() else []
    x = tokenizer(text, add_special_tokens=False)["input_ids"]
    budget = max_length - 3 - len(q)
    if len(t) + len(x) <= budget or budget - len(t) <= 0:
        return None
    tail = x[-(budget - len(t)):]
    ids = [tokenizer.cls_token_id, *q, tokenizer.sep_token_id, *t, *tail, tokenizer.sep_token_id]
    types = [0] * (len(q) + 2) + [1] * (len(t) + len(tail) + 1)
    return ids, types


def score_token_inputs(model, inputs, *, device: str = "cpu", bf16: bool = False, batch_size: int = 32,
                       pad_id: int = 0, desc: str = "window") -> np.ndarray:
    """Cross-encoder logits for already-assembled ``(input_ids, token_type_ids)`` sequences."""
    import torch

    out = np.zeros(len(inputs), dtype=np.float32)
    order = np.argsort([-len(ids) for ids, _ in inputs], kind="stable")
    bar = _progress(total=len(inputs), desc=desc, unit="pair", disable=len(inputs) < 256)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            width = max(len(inputs[i][0]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            types = torch.zeros((len(idx), width), dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                a, b = inputs[i]
                ids[row, : len(a)] = torch.tensor(a)
                types[row, : len(b)] = torch.tensor(b)
                mask[row, : len(a)] = 1
            with autocast(device, bf16):
                logits = model(input_ids=ids.to(device), token_type_ids=types.to(device),
                               attention_mask=mask.to(device)).logits
            out[idx] = logits.float()[:, 0].cpu().numpy()
            bar.update(len(idx))
    bar.close()
    return out


def evaluate_reranker(
    model_dir,
    dataset,
    split: str = "test",
    depth: int = 50,
    max_length: int = 256,
    *,
    encoder_dir=None,
    device: str = "auto",
    bf16: str = "off",
    batch_size: int = 32,
    threads: int | None = None,
    cache_dir=DEFAULT_CACHE,
    limit_queries: int | None = None,
    holdout: bool = False,
    fusion_weights: Sequence[float] = (),
    passage_windows: bool = False,
    rrf_k: int | None = None,
    leg_depth: int | None = None,
    bm25_stem: bool = False,
    ensemble_with=None,
) -> dict:
    """Hybrid first stage -> rerank top-``depth`` -> metrics for both runs.

    Returns ``{"first_stage": {...}, "reranked": {...}, ...}`` with NDCG@10, MRR@10, P@5.
    ``holdout``: evaluate only on the claims the checkpoint's trainer held out (its recipe's
    ``holdout_qids``; ``split`` must be the split it trained on). ``fusion_weights``: also
    report the served rerank fusion (``rerankd.stages.fusion.rerank_fusion``) at each weight,
    under ``"fusion"`` -- this is how the served default weight is chosen, on held-out claims.
    ``rrf_k`` / ``leg_depth``: the first stage's RRF constant (default the trainer's, 60) and how
    deep each leg retrieves before fusion (default ``depth``); the server's defaults are
    ``--rrf-k 20 --hybrid-depth 400``, so ``rrf_k=20, leg_depth=400`` approximates its rerank
    pool (exact cosine and bm25s here, HNSW and rerankd's BM25 there; ties broken differently).
    ``bm25_stem``: stem the BM25 leg (English Snowball), as the service's BM25 does; the trainer
    mines without stemming. With ``rrf_k=20, leg_depth=400, bm25_stem=True`` the pool is the
    served one up to HNSW's approximation.
    ``passage_windows``: also score a second window (title + end of the text, ``tail_window``)
    of every passage the pair truncates, and report the run ordered by the first window alone,
    the max and the mean of the two windows, under ``"windows"``.
    ``ensemble_with``: a second checkpoint scoring the same pairs; reports it alone and the
    score-level ensembles of the two (``combine_scores``: per-query z-scores summed, raw logits
    summed, reciprocal ranks summed) under ``"ensemble"``. With ``holdout`` both must have held out
    the same claims.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    t0 = time.time()
    held: list[str] = []
    if holdout:
        held, trained_split = _holdout_qids(model_dir)
        if split != trained_split:
            raise ValueError(f"--holdout: the model held out {trained_split!r} claims, not {split!r}")
        if ensemble_with is not None and _same_claims(_holdout_qids(ensemble_with)) != _same_claims((held, trained_split)):
            raise ValueError(f"--holdout: {ensemble_with} held out other claims than {model_dir}: "
                             "one of them was trained on the other's dev claims")
    dev = resolve_device(device)
    use_bf16 = resolve_bf16(bf16, dev)
    n_threads = set_threads(threads)
    dataset = Path(dataset)
    corpus = load_corpus(dataset)
    queries = load_queries(dataset)
    qrels = load_qrels(dataset, split)
    qids = [q for q in sorted(qrels) if q in queries]
    if holdout:
        held_set = set(held)
        qids = [q for q in qids if q in held_set]
    if limit_queries:
        qids = qids[:limit_queries]
    qrels = {q: qrels[q] for q in qids}

    retriever = HybridRetriever(
        corpus,
        Path(encoder_dir) if encoder_dir else default_base_dir(),
        device=dev,
        bf16=False,  # first stage in fp32, as served
        cache_dir=Path(cache_dir) if cache_dir else None,
        rrf_k=RRF_K if rrf_k is None else rrf_k,
        stem=bm25_stem,
    )
    legs = max(depth, leg_depth or depth)
    hits = retriever.search([queries[q] for q in qids], depth=depth, leg_depth=legs)
    fusion_k = retriever.rrf_k
    del retriever
    first_run = {
        q: {corpus.ids[d]: float(s) for d, s in h} for q, h in zip(qids, hits)
    }
    t_first = time.time() - t0
    # the rerank ceiling: the share of each query's relevant documents among its candidates
    recall = [len({d for d, v in qrels[q].items() if v > 0} & set(first_run[q])) /
              max(1, sum(1 for v in qrels[q].values() if v > 0)) for q in qids]

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), dtype=torch.float32
    ).to(dev).eval()
    pairs, owners, doc_index = [], [], []
    for q, h in zip(qids, hits):
        for d, _ in h:
            pairs.append((queries[q], corpus.full_text(d)))
            owners.append((q, corpus.ids[d]))
            doc_index.append(d)
    resume = _resume_path(cache_dir, model_dir, pairs, f"{max_length};{use_bf16};{batch_size}")
    stats: dict = {}
    t1 = time.time()
    scores = score_pairs(
        model, tok, pairs, device=dev, bf16=use_bf16, batch_size=batch_size,
        max_length=max_length, resume=resume, stats=stats,
    )
    t_rerank = time.time() - t1
    rerun: dict[str, dict[str, float]] = {}
    per_query: dict[str, list[tuple[str, int, float]]] = {}  # (doc, first-stage rank, score)
    for (q, d), s, rank in zip(owners, scores, _ranks(hits)):
        rerun.setdefault(q, {})[d] = float(s)
        per_query.setdefault(q, []).append((d, rank, float(s)))
    fusion = {}
    if fusion_weights:
        from rerankd.stages.fusion import rerank_fusion
    for w in fusion_weights:
        fused_run: dict[str, dict[str, float]] = {q: {} for q in qids}
        for q, rows in per_query.items():
            fused = rerank_fusion([s for _, _, s in rows], [r for _, r, _ in rows], float(w))
            fused_run[q] = {d: float(f) for (d, _, _), f in zip(rows, fused)}
        fusion[f"{float(w):g}"] = _metrics(qrels, fused_run)
    ensemble = {}
    if ensemble_with is not None:
        tok2 = AutoTokenizer.from_pretrained(str(ensemble_with))
        model2 = AutoModelForSequenceClassification.from_pretrained(
            str(ensemble_with), dtype=torch.float32
        ).to(dev).eval()
        other = score_pairs(
            model2, tok2, pairs, device=dev, bf16=use_bf16, batch_size=batch_size, max_length=max_length,
            desc="rerank (ensemble partner)",
            resume=_resume_path(cache_dir, ensemble_with, pairs, f"{max_length};{use_bf16};{batch_size}"),
        )
        del model2
        corr = float(np.corrcoef(scores, other)[0, 1]) if len(pairs) > 1 else float("nan")
        ensemble = {"partner": str(ensemble_with),
                    "logit_correlation": round(corr, 4) if np.isfinite(corr) else None}  # None: a constant model
        for how, erun in ensemble_runs(owners, qids, scores, other).items():
            ensemble[how] = _metrics(qrels, erun)
    windows = {}
    if passage_windows:
        cut = []
        for i, ((qt, _), d) in enumerate(zip(pairs, doc_index)):
            w = tail_window(tok, qt, corpus.titles[d] or "", corpus.texts[d] or "", max_length)
            if w is not None:
                cut.append((i, w))
        tail = scores.copy()
        if cut:
            tail[[i for i, _ in cut]] = score_token_inputs(
                model, [w for _, w in cut], device=dev, bf16=use_bf16, batch_size=batch_size,
                pad_id=tok.pad_token_id or 0, desc="tail window")
        for name, combined in (("first", scores), ("max", np.maximum(scores, tail)), ("mean", (scores + tail) / 2)):
            wrun: dict[str, dict[str, float]] = {q: {} for q in qids}
            for (q, d), v in zip(owners, combined):
                wrun[q][d] = float(v)
            windows[name] = _metrics(qrels, wrun)
        windows["truncated_pairs"] = len(cut)
    # queries whose first stage returned nothing still count (as zeros)
    for q in qids:
        first_run.setdefault(q, {})
        rerun.setdefault(q, {})

    result = {
        "model": str(model_dir),
        "dataset": str(dataset),
        "split": split,
        "queries": len(qids),
        "depth": depth,
        "max_length": max_length,
        "first_stage": _metrics(qrels, first_run),
        "candidate_recall": round(float(np.mean(recall)) if recall else 0.0, 4),
        "reranked": _metrics(qrels, rerun),
        **({"fusion": fusion} if fusion else {}),
        **({"windows": windows} if windows else {}),
        **({"ensemble": ensemble} if ensemble else {}),
        **({"holdout": True} if holdout else {}),
        "rrf_k": fusion_k,
        "leg_depth": legs,
        "bm25_stem": bm25_stem,
        "first_stage_desc": "hybrid: dense all-MiniLM-L6-v2 exact cosine + BM25 (bm25s"
                            + (", stemmed" if bm25_stem else "") + "), "
                            f"RRF k={fusion_k}"
                            + (f" over each leg's top {legs}" if legs > depth else "")
                            + f", top-{depth}",
        "rerank_precision": "bf16 autocast" if use_bf16 else "fp32",
        "rerank_pairs": len(pairs),
        "rerank_pairs_per_s": round(stats.get("scored", len(pairs)) / max(t_rerank, 1e-6), 1),
        "first_stage_wall_s": round(t_first, 1),
        "wall_s": round(time.time() - t0, 1),
        "machine": _machine(dev, n_threads),
    }
    return result


def _resume_path(cache_dir, model_dir, pairs, settings: str) -> Path | None:
    """Where ``score_pairs`` keeps partial scores of this model on these pairs (None: no cache)."""
    if not cache_dir:
        return None
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "pytorch_model.bin"):  # whichever exist
        f = Path(model_dir) / name
        if f.exists():
            h.update(f.read_bytes())
    h.update(settings.encode())
    for q, d in pairs:
        h.update(q.encode() + b"\0" + d.encode() + b"\1")
    return Path(cache_dir) / f"rerank-scores-{h.hexdigest()[:24]}.npz"


ENSEMBLES = ("z_mean", "raw_mean", "rr_mean")
RR_K = 60  # reciprocal-rank constant of the rr_mean ensemble (as in RRF)


def combine_scores(a: np.ndarray, b: np.ndarray, how: str) -> np.ndarray:
    """One query's candidates scored by two rerankers -> one score per candidate (higher first).

    ``z_mean``: each model's scores z-scored over the candidates, summed (scale-free; a model
    whose scores are all equal contributes 0). ``raw_mean``: the logits summed. ``rr_mean``:
    1/(60 + rank) under each model, summed (tied scores get consecutive ranks in list order)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"two score lists of different lengths: {a.shape} vs {b.shape}")
    if how == "raw_mean":
        return a + b
    if how == "z_mean":
        def z(x: np.ndarray) -> np.ndarray:
            sd = x.std()
            return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)
        return z(a) + z(b)
    if how == "rr_mean":
        def rr(x: np.ndarray) -> np.ndarray:
            rank = np.empty(len(x))
            rank[np.argsort(-x, kind="stable")] = np.arange(1, len(x) + 1)
            return 1.0 / (RR_K + rank)
        return rr(a) + rr(b)
    raise ValueError(f"unknown ensemble {how!r}: one of {', '.join(ENSEMBLES)}")


def ensemble_runs(owners, qids, a: np.ndarray, b: np.ndarray) -> dict[str, dict[str, dict[str, float]]]:
    """Runs ({query: {doc: score}}) of the partner alone and of each ensemble, each combined over
    one query's candidates at a time (``owners[i]`` = (query, doc) of pair i)."""
    rows_of: dict[str, list[int]] = {}
    for i, (q, _) in enumerate(owners):
        rows_of.setdefault(q, []).append(i)
    out = {}
    for how in ("partner_alone", *ENSEMBLES):
        run: dict[str, dict[str, float]] = {q: {} for q in qids}
        for q, rows in rows_of.items():
            idx = np.asarray(rows)
            combined = b[idx] if how == "partner_alone" else combine_scores(a[idx], b[idx], how)
            run[q] = {owners[i][1]: float(v) for i, v in zip(rows, combined)}
        out[how] = run
    return out


def _ranks(hits) -> list[int]:
    """1-based first-stage ranks, flattened in the same order as the rerank pairs."""
    return [r for h in hits for r in range(1, len(h) + 1)]


def _same_claims(held: tuple[list[str], str]) -> tuple[frozenset, str]:
    return frozenset(held[0]), held[1]


def _holdout_qids(model_dir) -> tuple[list[str], str]:
    cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    recipe = cfg.get("rerankd") or {}
    held = recipe.get("holdout_qids") or []
    if not held:
        raise ValueError(f"{model_dir} was trained without --holdout-queries: no held-out claims")
    return [str(q) for q in held], str(recipe.get("split", "train"))


def metrics_markdown(res: dict) -> str:
    fs, rr = res["first_stage"], res["reranked"]
    rows = [
        f"{res['dataset'].rstrip('/').split('/')[-1]} `{res['split']}` ({res['queries']} queries), "
        f"reranking the {res['first_stage_desc']}; cross-encoder max length "
        f"{res['max_length']}, {res['rerank_precision']} "
        f"(`python -m rerankd_export.quick_eval`).",
        "",
        "| run | NDCG@10 | MRR@10 | P@5 |",
        "|---|---|---|---|",
        f"| first stage (hybrid) | {fs['NDCG@10']:.4f} | {fs['MRR@10']:.4f} | {fs['P@5']:.4f} |",
        f"| + rerankd-ce-MiniLM-L6 top-{res['depth']} | {rr['NDCG@10']:.4f} | {rr['MRR@10']:.4f} | {rr['P@5']:.4f} |",
        "",
        f"Reranking throughput during evaluation: {res['rerank_pairs_per_s']} pairs/s on "
        f"{res['machine']}.",
    ]
    return "\n".join(rows)


def update_card(model_dir, res: dict) -> None:
    """Write the metrics into README.md (between the markers) and config.json."""
    model_dir = Path(model_dir)
    card = model_dir / "README.md"
    md = metrics_markdown(res)
    if card.exists():
        text = card.read_text(encoding="utf-8")
        if CARD_METRICS_START in text and CARD_METRICS_END in text:
            head, rest = text.split(CARD_METRICS_START, 1)
            _, tail = rest.split(CARD_METRICS_END, 1)
            text = f"{head}{CARD_METRICS_START}\n{md}\n{CARD_METRICS_END}{tail}"
        else:
            text = text.rstrip() + f"\n\n## Evaluation\n\n{CARD_METRICS_START}\n{md}\n{CARD_METRICS_END}\n"
        card.write_text(text, encoding="utf-8")
    cfg_path = model_dir / "config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        evals = cfg.setdefault("rerankd", {}).setdefault("eval", {})
        key = f"{Path(res['dataset']).name}/{res['split']}@{res['depth']}"
        if res.get("holdout"):
            key += ";holdout"
        if res.get("rrf_k", RRF_K) != RRF_K or res.get("leg_depth", res["depth"]) != res["depth"]:
            key += f";rrf{res['rrf_k']}x{res['leg_depth']}"
        if res.get("bm25_stem"):
            key += ";stem"
        evals[key] = {k: res[k] for k in ("first_stage", "reranked", "queries", "max_length", "rerank_precision",
                                          "first_stage_desc") if k in res}
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rerankd_export.quick_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="cross-encoder checkpoint dir")
    p.add_argument("--dataset", required=True, type=Path)
    p.add_argument("--split", default="test")
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--encoder", type=Path, default=None, help="first-stage bi-encoder dir")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="off",
                   help="bf16 autocast for the reranker (default off: fp32 as served)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="'none' to disable")
    p.add_argument("--limit-queries", type=int, default=None, help="first N queries only")
    p.add_argument("--holdout", action="store_true",
                   help="evaluate on the claims the checkpoint's trainer held out (--holdout-queries)")
    p.add_argument("--fusion-weights", type=float, nargs="*", default=(), metavar="W",
                   help="also report the served rerank fusion at these weights")
    p.add_argument("--passage-windows", action="store_true",
                   help="also score a title + end-of-text window of each truncated passage and "
                        "report first-window / max / mean orderings")
    p.add_argument("--rrf-k", type=int, default=None,
                   help="first-stage RRF constant [default: the trainer's, 60; the server's is 20]")
    p.add_argument("--leg-depth", type=int, default=None,
                   help="each first-stage leg's depth before fusion [default --depth; the "
                        "server's --hybrid-depth is 400]")
    p.add_argument("--bm25-stem", action="store_true",
                   help="stem the BM25 leg (English Snowball) as the service does [default: off, "
                        "as the trainer mines]")
    p.add_argument("--ensemble-with", type=Path, default=None, metavar="CHECKPOINT",
                   help="also score the pairs with this second cross-encoder and report it alone "
                        "and the score-level ensembles of the two (z-score, logit and "
                        "reciprocal-rank sums)")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    p.add_argument("--update-card", action="store_true",
                   help="write the metrics into the checkpoint's README.md and config.json")
    a = p.parse_args(argv)
    if a.rrf_k is not None and a.rrf_k < 0:
        p.error(f"--rrf-k must be >= 0, got {a.rrf_k}")
    if a.leg_depth is not None and a.leg_depth < 1:
        p.error(f"--leg-depth must be >= 1, got {a.leg_depth}")
    cache = None if str(a.cache_dir).lower() in ("", "none", "off") else a.cache_dir
    res = evaluate_reranker(
        a.model, a.dataset, a.split, a.depth, a.max_length, encoder_dir=a.encoder,
        device=a.device, bf16=a.bf16, batch_size=a.batch_size, threads=a.threads,
        cache_dir=cache, limit_queries=a.limit_queries, holdout=a.holdout,
        fusion_weights=a.fusion_weights, passage_windows=a.passage_windows,
        rrf_k=a.rrf_k, leg_depth=a.leg_depth, bm25_stem=a.bm25_stem, ensemble_with=a.ensemble_with,
    )
    print(json.dumps(res, indent=2))
    print(metrics_markdown(res), file=sys.stderr)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    if a.update_card:
        if a.limit_queries:
            print("refusing --update-card with --limit-queries", file=sys.stderr)
            return 2
        update_card(a.model, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
