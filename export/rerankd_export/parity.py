"""Numerical parity checks for exported bundles.

* fp32 ONNX (ONNX Runtime, CPU) vs the PyTorch fp32 model it was exported from, on real text, at
  several batch sizes and sequence lengths that differ from the exporter's dummy inputs (an
  exporter that bakes a shape into the graph is caught here).
* int8 ONNX (dynamic quantization) vs the fp32 ONNX model, on the same inputs, against a looser
  accuracy gate.

Tokenization always goes through the bundle's own ``tokenizer.json`` (the file the service loads),
padded to the longest sequence in the batch, truncated to ``max_length``; rerank pairs are
truncated ``only_second`` so the query survives intact.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "EMBED_TOLERANCE",
    "RERANK_TOLERANCE",
    "INT8_EMBED_MIN_COSINE",
    "INT8_RERANK_MAX_ABS_DIFF",
    "BATCH_SIZES",
    "SHORT_TEXTS",
    "PASSAGES",
    "ParityError",
    "Int8GateError",
    "ParityCase",
    "configure_tokenizer",
    "load_bundle_tokenizer",
    "build_cases",
    "encode",
    "onnx_session",
    "run_onnx",
    "mean_pool_normalize",
    "torch_outputs",
    "check_fp32_parity",
    "check_int8_gate",
    "spearman",
]

logger = logging.getLogger("rerankd_export.parity")

# --------------------------------------------------------------------------------------------
# Tolerances (the contract: docs/bundle-format.md)
# --------------------------------------------------------------------------------------------
#: fp32 ONNX vs torch fp32, max |diff| over the L2-normalized mean-pooled vectors.
EMBED_TOLERANCE = 1e-4
#: fp32 ONNX vs torch fp32, max |diff| over the raw logits.
RERANK_TOLERANCE = 1e-3
#: int8 ONNX vs fp32 ONNX, minimum cosine similarity between pooled normalized vectors.
INT8_EMBED_MIN_COSINE = 0.98
#: int8 ONNX vs fp32 ONNX, max |diff| over the raw logits ...
INT8_RERANK_MAX_ABS_DIFF = 0.25
#: ... and the Spearman correlation of all the gate's logits (as the OpenVINO int8 gate asks).
INT8_RERANK_MIN_SPEARMAN = 0.99

BATCH_SIZES = (1, 4, 16)
LENGTH_KINDS = ("short", "medium", "long", "mixed")

# --------------------------------------------------------------------------------------------
# Built-in real text: short scientific claims (~8-20 tokens) and abstract-like passages
# (~60-110 tokens). Long inputs are several passages joined and truncated to max_length.
# --------------------------------------------------------------------------------------------
SHORT_TEXTS: tuple[str, ...] = (
    "Vitamin D supplementation reduces the risk of respiratory infections.",
    "Aspirin lowers the incidence of colorectal cancer.",
    "Microglia prune synapses during brain development.",
    "Sleep deprivation impairs glucose tolerance in healthy adults.",
    "CRISPR-Cas9 can correct the mutation that causes sickle cell disease.",
    "Gut bacteria influence the efficacy of cancer immunotherapy.",
    "Statins increase the risk of type 2 diabetes.",
    "Telomere length predicts mortality in older people.",
    "Antibiotic use in infancy is linked to childhood obesity.",
    "Mitochondrial DNA is inherited only from the mother.",
    "Coffee consumption is associated with lower liver cirrhosis risk.",
    "Exercise increases hippocampal volume in older adults.",
    "What causes antibiotic resistance in hospital pathogens?",
    "How does insulin regulate blood sugar?",
    "Measles vaccination does not cause autism.",
    "Tau tangles spread between connected neurons.",
    "Air pollution exposure raises the risk of dementia.",
    "Intermittent fasting improves insulin sensitivity.",
    "Zinc lozenges shorten the duration of the common cold.",
    "p53 mutations are the most common genetic alteration in human cancer.",
)

PASSAGES: tuple[str, ...] = (
    "We conducted a randomized, double-blind, placebo-controlled trial of daily vitamin D3 "
    "supplementation in 2,000 adults over three winters. The primary outcome was the incidence "
    "of acute respiratory tract infection. Supplementation reduced infections among participants "
    "with baseline deficiency but had no detectable effect in those with adequate levels.",
    "Long-term follow-up of cardiovascular prevention trials showed that low-dose aspirin taken "
    "for at least five years reduced the incidence of colorectal cancer by roughly a quarter. "
    "The benefit appeared only after a latency of about ten years and was largest for tumours of "
    "the proximal colon.",
    "Using live imaging in the developing mouse visual system, we show that microglia engulf "
    "presynaptic inputs in a complement-dependent manner. Mice lacking the complement receptor "
    "retained excess synapses into adulthood, indicating that microglial pruning shapes circuit "
    "refinement.",
    "Eleven healthy young men were restricted to four hours of sleep for six nights and then "
    "allowed to recover. During restriction, glucose clearance after an intravenous challenge "
    "fell by almost forty percent and the acute insulin response decreased, changes comparable "
    "to those seen in early insulin resistance.",
    "Hematopoietic stem cells from patients with sickle cell disease were edited ex vivo to "
    "disrupt the erythroid enhancer of BCL11A, reactivating fetal hemoglobin. After "
    "transplantation, all treated patients had high fetal hemoglobin levels and were free of "
    "vaso-occlusive crises during follow-up.",
    "Patients with metastatic melanoma who responded to anti-PD-1 therapy had gut microbiomes "
    "enriched in particular bacterial species. Fecal transplantation from responders into "
    "germ-free mice improved tumour control, suggesting that commensal bacteria modulate the "
    "response to checkpoint blockade.",
    "In a meta-analysis of thirteen statin trials with more than ninety thousand participants, "
    "statin therapy was associated with a nine percent increased risk of incident diabetes. "
    "The absolute risk was low and was outweighed by the reduction in coronary events.",
    "Leukocyte telomere length was measured in a prospective cohort of older adults followed for "
    "fifteen years. Shorter telomeres were associated with higher all-cause mortality after "
    "adjustment for age and sex, although the association weakened after accounting for "
    "smoking and chronic disease.",
    "A nationwide birth cohort linked prescription records with growth measurements. Children "
    "exposed to antibiotics before the age of two had a modestly higher body mass index at "
    "school age, with a dose-response relation for the number of courses.",
    "Paternal mitochondria are normally eliminated after fertilization. We describe three "
    "unrelated families in which mitochondrial DNA from both parents was transmitted to the "
    "offspring, challenging the dogma of strictly maternal inheritance.",
    "Pooled data from nine observational studies indicate that drinking two or more cups of "
    "coffee per day is associated with a lower risk of liver cirrhosis. The inverse association "
    "was consistent across alcohol-related and non-alcoholic causes of liver disease.",
    "One hundred and twenty older adults were randomized to aerobic walking or stretching for "
    "one year. Magnetic resonance imaging showed that walking increased the volume of the "
    "anterior hippocampus by two percent, effectively reversing age-related loss by one to two "
    "years, and the increase correlated with improved spatial memory.",
    "Resistance to carbapenems in Klebsiella pneumoniae is mostly mediated by plasmid-encoded "
    "carbapenemases that spread horizontally between strains. Genomic surveillance in hospitals "
    "revealed repeated transmission of a few high-risk clones between wards.",
    "Insulin binds its receptor on muscle and fat cells, triggering a signalling cascade that "
    "moves glucose transporters to the cell membrane. In the liver, insulin suppresses glucose "
    "production and promotes storage of glycogen.",
    "A cohort study of all children born in Denmark over a decade found no increase in the risk "
    "of autism after measles, mumps and rubella vaccination, including in subgroups of children "
    "with autistic siblings or other risk factors.",
    "Injecting pathological tau into one brain region of transgenic mice led to tau aggregates "
    "appearing in anatomically connected regions over several months, consistent with "
    "trans-synaptic propagation rather than spread to merely adjacent tissue.",
    "Residential exposure to fine particulate matter was estimated for older adults enrolled in "
    "a national health survey. Each increase of ten micrograms per cubic metre was associated "
    "with a higher hazard of incident dementia, independent of socioeconomic status.",
    "Overweight adults were assigned to time-restricted eating or usual care for twelve weeks. "
    "The intervention produced small weight loss, and insulin sensitivity measured by clamp "
    "improved only in participants who ate their meals early in the day.",
    "A systematic review of randomized trials found that zinc acetate lozenges started within a "
    "day of symptom onset shortened colds by about a third. Adverse effects were mostly a bad "
    "taste and nausea.",
    "Sequencing of more than ten thousand tumours across thirty cancer types identified TP53 as "
    "the most frequently mutated gene. Most mutations were missense changes clustered in the "
    "DNA-binding domain and were associated with genomic instability and poor prognosis.",
)

Encoding = dict  # input name -> np.ndarray[int64] of shape [B, T]


class ParityError(RuntimeError):
    """ONNX output differs from the reference beyond the tolerance (the bundle is not written)."""

    def __init__(self, message: str, record: dict | None = None) -> None:
        super().__init__(message)
        self.record = record


class Int8GateError(ParityError):
    """The int8 variant is not accurate enough compared with fp32 ONNX (the bundle is not written)."""


@dataclass
class ParityCase:
    kind: str  # short | medium | long | mixed | extra
    batch: int
    texts: list  # list[str] (embed) or list[tuple[str, str]] (rerank)
    encoding: Encoding
    length: int  # padded sequence length of the batch

    def describe(self) -> str:
        return f"{self.kind} batch={self.batch} length={self.length}"


# --------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------
def configure_tokenizer(tokenizer, max_length: int, task: str, pad_id: int, pad_token: str):
    """Truncate to ``max_length`` (``only_second`` for rerank pairs) and pad to the batch longest."""
    strategy = "only_second" if task == "rerank" else "longest_first"
    tokenizer.enable_truncation(max_length=max_length, strategy=strategy, direction="right")
    tokenizer.enable_padding(direction="right", pad_id=pad_id, pad_type_id=0, pad_token=pad_token)
    return tokenizer


def load_bundle_tokenizer(path: str | os.PathLike[str]):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def encode(tokenizer, texts: Sequence, input_names: Sequence[str]) -> Encoding:
    """Batch-encode with the (configured) bundle tokenizer into int64 arrays named like the ONNX inputs."""
    encs = tokenizer.encode_batch(list(texts))
    fields = {
        "input_ids": [e.ids for e in encs],
        "attention_mask": [e.attention_mask for e in encs],
        "token_type_ids": [e.type_ids for e in encs],
    }
    out = {}
    for name in input_names:
        if name not in fields:
            raise ValueError(f"don't know how to feed ONNX input {name!r}")
        out[name] = np.asarray(fields[name], dtype=np.int64)
    return out


def _n_tokens(tokenizer, text) -> int:
    return len(tokenizer.encode(*text) if isinstance(text, tuple) else tokenizer.encode(text))


def _long_texts(max_length: int, count: int) -> list[str]:
    """Texts made of consecutive passages, long enough to be truncated at ``max_length``."""
    out = []
    # ~1.3 tokens/word; aim for > 1.5x max_length words' worth of tokens so truncation is certain.
    for i in range(count):
        parts, words = [], 0
        j = i
        while words < max_length * 1.2 + 40:
            p = PASSAGES[j % len(PASSAGES)]
            parts.append(p)
            words += len(p.split())
            j += 1
        out.append(" ".join(parts))
    return out


def _pick(pool: Sequence, start: int, n: int) -> list:
    return [pool[(start + i) % len(pool)] for i in range(n)]


def build_cases(
    task: str,
    tokenizer,
    input_names: Sequence[str],
    max_length: int,
    extra_texts: Sequence[str] | None = None,
    batch_sizes: Sequence[int] = BATCH_SIZES,
) -> list[ParityCase]:
    """The parity inputs: every batch size x {short, medium, long, mixed} (+ ``extra`` batches).

    ``long`` inputs exceed ``max_length`` and are truncated to it; ``mixed`` batches alternate
    short and long inputs so most rows are heavily padded.
    """
    if task not in ("embed", "rerank"):
        raise ValueError(f"task must be 'embed' or 'rerank', not {task!r}")
    longs = _long_texts(max_length, len(PASSAGES))
    if task == "embed":
        pools = {"short": list(SHORT_TEXTS), "medium": list(PASSAGES), "long": longs}
    else:
        # Query = a claim; passage = another claim (short), an abstract (medium), or several
        # abstracts (long, truncated only_second). Offsets avoid always pairing i with i.
        q = list(SHORT_TEXTS)
        pools = {
            "short": [(q[i], q[(i + 7) % len(q)]) for i in range(len(q))],
            "medium": [(q[i], PASSAGES[i % len(PASSAGES)]) for i in range(len(q))]
            + [(q[i], PASSAGES[(i + 3) % len(PASSAGES)]) for i in range(len(q))],
            "long": [(q[i], longs[(i + 1) % len(longs)]) for i in range(len(q))],
        }
    cases: list[ParityCase] = []
    for bi, b in enumerate(batch_sizes):
        for kind in LENGTH_KINDS:
            if kind == "mixed":
                if b < 2:
                    continue
                texts = [
                    (pools["short"] if i % 2 == 0 else pools["long"])[(bi * 5 + i) % len(pools["short"])]
                    for i in range(b)
                ]
            else:
                texts = _pick(pools[kind], bi * 5, b)
            enc = encode(tokenizer, texts, input_names)
            cases.append(ParityCase(kind, b, texts, enc, int(enc["input_ids"].shape[1])))
    if extra_texts:
        extra = [t for t in extra_texts if t and t.strip()]
        if task == "rerank":
            extra = [(SHORT_TEXTS[i % len(SHORT_TEXTS)], t) for i, t in enumerate(extra)]
        for i in range(0, len(extra), 16):
            texts = extra[i : i + 16]
            enc = encode(tokenizer, texts, input_names)
            cases.append(ParityCase("extra", len(texts), texts, enc, int(enc["input_ids"].shape[1])))
    return cases


# --------------------------------------------------------------------------------------------
# Running the models
# --------------------------------------------------------------------------------------------
def onnx_session(path: str | os.PathLike[str]):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(session, encoding: Encoding, output: str) -> np.ndarray:
    names = [i.name for i in session.get_inputs()]
    return session.run([output], {n: encoding[n] for n in names})[0]


def mean_pool_normalize(last_hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """sentence-transformers ``Pooling(mean)`` + ``Normalize``, in float64 for a stable reference."""
    h = last_hidden.astype(np.float64)
    m = attention_mask.astype(np.float64)[..., None]
    pooled = (h * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
    norm = np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled / np.clip(norm, 1e-12, None)


def torch_outputs(model, encoding: Encoding, output: str) -> np.ndarray:
    import torch

    with torch.inference_mode():
        feeds = {k: torch.from_numpy(v) for k, v in encoding.items()}
        out = model(**feeds)
        return getattr(out, output).float().numpy()


def _compare(task: str, a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    if task == "embed":
        a, b = mean_pool_normalize(a, mask), mean_pool_normalize(b, mask)
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def _bar(iterable, desc: str):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit="case", leave=False, disable=None)


def check_fp32_parity(
    task: str,
    model,
    onnx_path: str | os.PathLike[str],
    cases: Sequence[ParityCase],
    output: str,
    tolerance: float | None = None,
    onnx_runner: Callable[..., np.ndarray] | None = None,
) -> tuple[dict, list[np.ndarray]]:
    """ONNX Runtime fp32 vs torch fp32 over ``cases``; raises :class:`ParityError` above tolerance.

    Returns the manifest ``parity`` record and the raw ONNX outputs per case (reused by the int8
    gate). ``onnx_runner`` (default :func:`run_onnx`) exists for tests.
    """
    if tolerance is None:
        tolerance = EMBED_TOLERANCE if task == "embed" else RERANK_TOLERANCE
    runner = onnx_runner or run_onnx
    session = onnx_session(onnx_path)
    records, outputs = [], []
    for case in _bar(cases, f"parity fp32 ({task})"):
        ref = torch_outputs(model, case.encoding, output)
        got = runner(session, case.encoding, output)
        if got.shape != ref.shape:
            raise ParityError(
                f"ONNX output {output!r} has shape {got.shape}, torch has {ref.shape} "
                f"({case.describe()}): the graph does not handle this shape"
            )
        diff = _compare(task, got, ref, case.encoding["attention_mask"])
        if not np.isfinite(diff):
            diff = float("inf")
        records.append({"kind": case.kind, "batch": case.batch, "length": case.length,
                        "max_abs_diff": diff})
        outputs.append(got)
    worst = max(records, key=lambda r: r["max_abs_diff"])
    record = {
        "reference": "torch fp32",
        "metric": "max_abs_diff",
        "compared": "pooled normalized vectors" if task == "embed" else "logits",
        "tolerance": tolerance,
        "max_abs_diff": worst["max_abs_diff"],
        "cases": records,
    }
    bad = [r for r in records if not r["max_abs_diff"] <= tolerance]
    if bad:
        detail = "; ".join(
            f"{r['kind']} batch={r['batch']} length={r['length']}: {r['max_abs_diff']:.3g}" for r in bad
        )
        raise ParityError(
            f"{task} fp32 ONNX vs torch parity FAILED: max_abs_diff {worst['max_abs_diff']:.3g} > "
            f"tolerance {tolerance:g} in {len(bad)}/{len(records)} cases ({detail})",
            record,
        )
    logger.info("fp32 parity ok (%s): max_abs_diff %.3g <= %g over %d cases",
                task, worst["max_abs_diff"], tolerance, len(records))
    return record, outputs


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (NaN when either side is constant); see :mod:`rerankd.drift`."""
    from rerankd.drift import spearman as _spearman

    return _spearman(a, b)


def check_int8_gate(
    task: str,
    int8_path: str | os.PathLike[str],
    cases: Sequence[ParityCase],
    fp32_outputs: Sequence[np.ndarray],
    output: str,
    min_cosine: float | None = None,
    max_abs_diff: float | None = None,
) -> dict:
    """int8 ONNX vs fp32 ONNX over the parity cases; raises :class:`Int8GateError` past the gate."""
    if min_cosine is None:
        min_cosine = INT8_EMBED_MIN_COSINE
    if max_abs_diff is None:
        max_abs_diff = INT8_RERANK_MAX_ABS_DIFF
    session = onnx_session(int8_path)
    records = []
    all_ref, all_got = [], []
    for case, ref in zip(cases, _bar(fp32_outputs, f"gate int8 ({task})")):
        got = run_onnx(session, case.encoding, output)
        if task == "embed":
            mask = case.encoding["attention_mask"]
            a, b = mean_pool_normalize(got, mask), mean_pool_normalize(ref, mask)
            cos = float(np.min(np.sum(a * b, axis=1)))
            records.append({"kind": case.kind, "batch": case.batch, "length": case.length,
                            "min_cosine": cos})
        else:
            diff = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))
            records.append({"kind": case.kind, "batch": case.batch, "length": case.length,
                            "max_abs_diff": diff})
            all_ref.append(ref.ravel())
            all_got.append(got.ravel())
    if task == "embed":
        # A non-finite case is the worst case: Python's min() skips a NaN that is not first.
        worst = min(r["min_cosine"] if np.isfinite(r["min_cosine"]) else float("-inf") for r in records)
        record = {"reference": "onnx fp32", "metric": "min_cosine", "gate": min_cosine,
                  "min_cosine": worst, "cases": records}
        ok = worst >= min_cosine
        summary = f"min cosine {worst:.5f} (gate >= {min_cosine})"
    else:
        ref, got = np.concatenate(all_ref), np.concatenate(all_got)
        worst = max(r["max_abs_diff"] if np.isfinite(r["max_abs_diff"]) else float("inf") for r in records)
        rho = spearman(ref, got)
        record = {"reference": "onnx fp32", "metric": "max_abs_diff", "gate": max_abs_diff,
                  "max_abs_diff": worst, "spearman": rho, "pairs": int(ref.size),
                  "logit_std_fp32": float(np.std(ref)), "cases": records}
        # The absolute budget alone passed a reranker whose logits span less than it (a review:
        # Spearman 0.45 on a model with logit sd 0.08): the ranking must hold too.
        record["min_spearman"] = INT8_RERANK_MIN_SPEARMAN
        ok = worst <= max_abs_diff and bool(rho >= INT8_RERANK_MIN_SPEARMAN)
        summary = (f"max_abs_diff {worst:.4f} (gate <= {max_abs_diff}), Spearman {rho:.4f} (gate >= "
                   f"{INT8_RERANK_MIN_SPEARMAN}) over {ref.size} pairs")
    if not ok:
        raise Int8GateError(f"{task} int8 variant REFUSED: {summary}", record)
    logger.info("int8 gate ok (%s): %s", task, summary)
    return record
