"""Token-level precision, recall and F1 of hard rationale predictions (../shared/METHODS.md section 6).

A results file is ERASER's JSON lines format, one line per document::

    {"annotation_id": ..., "rationales": [{"docid": ...,
        "hard_rationale_predictions": [{"start_token": i, "end_token": j}, ...]}],
     "classification": "POS", "classification_scores": {"NEG": 0.1, "POS": 0.9}}

Scoring follows the ERASER reference code's token-level ("token_prf")
figures: every span is expanded into its tokens; for each (annotation,
document) pair present in the truth or the prediction, precision = |T & P| / |P|
(0 when P is empty), recall = |T & P| / |T| (0 when T is empty) and
F1 = 2PR / (P + R) (0 when either is 0).  **Macro** figures are the means of the
per-document precision, recall and F1; **micro** figures pool the counts of all
documents, and micro F1 is the F1 of micro precision and recall.

Usage::

    python BERT_rationale_benchmark/metrics.py --data-dir DIR --split test --results FILE
    python BERT_rationale_benchmark/metrics.py --data-dir DIR --split test --results-dir OUT

The second form scores ``OUT/<method>/identifier_results_<k>.json`` for every
method folder and k, prints the table and writes ``token_f1.{md,csv,json,png}``.

A results file must cover every annotation of the split: an incomplete or
empty one is refused (exit 2) naming what is missing, since the missing
documents would silently count as F1 0.  ``--allow-subset`` scores only the
documents present (the truth restricted to them) and says so.

**Every score of the published ERASER scorer** (issue 23;
:mod:`BERT_rationale_benchmark.eraser_scores` holds the definitions and the
published script's quirks): ``--results FILE --score-file OUT`` writes the
published ``--score_file`` layout (``iou_scores``, ``rationale_prf``,
``token_prf``, ``token_soft_metrics``, ``sentence_soft_metrics``,
``classification_scores`` with accuracy, the per-class report,
comprehensiveness, sufficiency, their entropy / KL variants and AOPC), and
``--results-dir`` writes it for every method and k to ``eraser_scores.json``
and prints the per-method table (``eraser_scores.md``).  A file whose optional
fields are in some records only, whose distributions lack a class, whose
soft scores do not cover the document or whose AOPC bins are incomplete is
refused in one line (exit 2).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BERT_rationale_benchmark import eraser_scores  # noqa: E402
from BERT_rationale_benchmark.utils import (SPLITS, Annotation, ERASERFormatError, PathLike,  # noqa: E402
                                            annotation_docid, check_evidence_offsets, load_documents, load_jsonl,
                                            load_split)
from modules import cli  # noqa: E402

__all__ = [
    "PRF", "TokenScores", "f1", "prf", "score_token_sets", "truth_token_sets", "predicted_token_sets",
    "load_results", "covered_annotations", "score_results", "find_result_files", "check_same_run", "score_results_dir", "format_table",
    "write_table", "plot_f1", "main", "ScoringData", "load_scoring_data", "full_scores", "score_results_dir_full",
    "format_eraser_table", "format_faithfulness_table", "write_eraser_scores", "write_score_file",
]

Key = Tuple[str, str]  # (annotation_id, docid)
RESULT_FILE = re.compile(r"^identifier_results_(\d+)\.json$")


@dataclass(frozen=True)
class PRF:
    """Precision, recall and F1 (fractions in [0, 1])."""

    precision: float
    recall: float
    f1: float


@dataclass(frozen=True)
class TokenScores:
    """Token-level scores of one results file."""

    macro: PRF
    micro: PRF
    documents: int
    per_document: Dict[Key, PRF]
    accuracy: Optional[float] = None


def f1(precision: float, recall: float) -> float:
    """Harmonic mean 2PR / (P + R); 0 when either is 0 (ERASER's ``_f1``)."""
    if precision == 0 or recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def prf(truth: Set[int], pred: Set[int]) -> PRF:
    """Token precision |T & P| / |P|, recall |T & P| / |T| and their F1 for
    one document; an empty P (or T) gives precision (recall) 0."""
    hit = len(truth & pred)
    p = hit / len(pred) if pred else 0.0
    r = hit / len(truth) if truth else 0.0
    return PRF(p, r, f1(p, r))


def score_token_sets(truth: Mapping[Key, Set[int]], pred: Mapping[Key, Set[int]]) -> TokenScores:
    """Macro and micro token-level scores over every key of ``truth`` or ``pred``.

    Macro: means of the per-key precision, recall and F1. Micro: precision =
    sum |T & P| / sum |P|, recall = sum |T & P| / sum |T|, F1 of the two.
    """
    keys = sorted(set(truth) | set(pred))
    per_doc = {k: prf(truth.get(k, set()), pred.get(k, set())) for k in keys}
    n = len(keys)
    if n == 0:
        zero = PRF(0.0, 0.0, 0.0)
        return TokenScores(zero, zero, 0, {})
    macro = PRF(sum(s.precision for s in per_doc.values()) / n,
                sum(s.recall for s in per_doc.values()) / n,
                sum(s.f1 for s in per_doc.values()) / n)
    hits = sum(len(truth.get(k, set()) & pred.get(k, set())) for k in keys)
    n_pred = sum(len(v) for v in pred.values())
    n_truth = sum(len(v) for v in truth.values())
    mp = hits / n_pred if n_pred else 0.0
    mr = hits / n_truth if n_truth else 0.0
    return TokenScores(macro, PRF(mp, mr, f1(mp, mr)), n, per_doc)


def truth_token_sets(annotations: Iterable[Annotation]) -> Dict[Key, Set[int]]:
    """Human evidence tokens per (annotation id, docid); annotations without
    evidence contribute no key (as in ERASER)."""
    out: Dict[Key, Set[int]] = {}
    for ann in annotations:
        for docid, tokens in ann.evidence_tokens().items():
            out.setdefault((ann.annotation_id, docid), set()).update(tokens)
    return out


def predicted_token_sets(results: Iterable[dict]) -> Dict[Key, Set[int]]:
    """Predicted tokens per (annotation id, docid): every hard rationale span
    expanded into its tokens.  A document listed without spans gets an empty set."""
    out: Dict[Key, Set[int]] = {}
    for inst in results:
        for rat in inst.get("rationales", []):
            tokens = out.setdefault((inst["annotation_id"], rat["docid"]), set())
            for span in rat.get("hard_rationale_predictions") or []:
                tokens.update(range(span["start_token"], span["end_token"]))
    return out


def _check_results(results: List[dict], path: PathLike, annotations: Dict[str, Annotation],
                   documents: Mapping[str, Sequence[str]], split: str) -> None:
    seen: Dict[str, int] = {}
    for line, inst in enumerate(results, start=1):
        where = f"{path}: record {line}"
        ann_id = inst.get("annotation_id")
        if not isinstance(ann_id, str):
            raise ERASERFormatError(f"{where}: missing string field 'annotation_id'")
        if ann_id not in annotations:
            raise ERASERFormatError(f"{where}: annotation id {ann_id!r} is not in the {split} split")
        if ann_id in seen:
            raise ERASERFormatError(f"{where}: annotation id {ann_id!r} repeats record {seen[ann_id]}")
        seen[ann_id] = line
        rats = inst.get("rationales")
        if not isinstance(rats, list):
            raise ERASERFormatError(f"{where}: 'rationales' must be a list")
        for rat in rats:
            if not isinstance(rat, dict) or not isinstance(rat.get("docid"), str):
                raise ERASERFormatError(f"{where}: each rationale needs a string 'docid'")
            docid = rat["docid"]
            if docid not in documents:
                raise ERASERFormatError(f"{where}: unknown docid {docid!r}")
            n = len(documents[docid])
            for span in rat.get("hard_rationale_predictions") or []:
                s, e = (span.get("start_token"), span.get("end_token")) if isinstance(span, dict) else (None, None)
                whole = all(isinstance(v, int) and not isinstance(v, bool) for v in (s, e))  # true is not 1
                if not (whole and 0 <= s <= e <= n):
                    raise ERASERFormatError(
                        f"{where}: span {span!r} is not a token range inside {docid!r} ({n} tokens)")


def load_results(path: PathLike, annotations: Sequence[Annotation], documents: Mapping[str, Sequence[str]],
                 split: str = "test") -> List[dict]:
    """Read and validate a results file against the split's annotations.

    Raises
    ------
    ERASERFormatError
        Malformed lines (file and line number), unknown annotation ids or
        docids, repeated ids, spans outside their document.
    """
    results = load_jsonl(path)
    if not results:
        raise ERASERFormatError(f"{path}: no records (an empty results file scores nothing)")
    _check_results(results, path, {a.annotation_id: a for a in annotations}, documents, split)
    return results


def covered_annotations(results: Sequence[dict], annotations: Sequence[Annotation], path: PathLike,
                        split: str = "test", allow_subset: bool = False) -> List[Annotation]:
    """The annotations ``results`` are scored against.

    All of the split when ``results`` covers every annotation; otherwise an
    :class:`ERASERFormatError` naming how many and which are missing, unless
    ``allow_subset``, when only the annotations present are returned (the
    missing documents are then left out, not counted as F1 0).
    """
    present = {r["annotation_id"] for r in results}
    missing = [a.annotation_id for a in annotations if a.annotation_id not in present]
    if not missing:
        return list(annotations)
    if not allow_subset:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ERASERFormatError(f"{path}: results for {len(present)} of {len(annotations)} documents of the {split} "
                                f"split; missing {len(missing)} ({shown}); pass --allow-subset to score only "
                                f"those present")
    return [a for a in annotations if a.annotation_id in present]


def score_results(results: Sequence[dict], annotations: Sequence[Annotation]) -> TokenScores:
    """Token scores of validated ``results`` against the annotations' evidence,
    plus the classification accuracy when every record has a ``classification``."""
    scores = score_token_sets(truth_token_sets(annotations), predicted_token_sets(results))
    accuracy = None
    if results and all("classification" in r for r in results):
        gold = {a.annotation_id: a.classification for a in annotations}
        accuracy = sum(r["classification"] == gold[r["annotation_id"]] for r in results) / len(results)
    return TokenScores(scores.macro, scores.micro, scores.documents, scores.per_document, accuracy)


def find_result_files(results_dir: PathLike) -> Dict[str, Dict[int, Path]]:
    """``{method: {k: path}}`` for every ``identifier_results_<k>.json`` in
    ``results_dir``'s subfolders (the folder name is the method) or in
    ``results_dir`` itself (named after the folder)."""
    root = Path(results_dir)
    found: Dict[str, Dict[int, Path]] = {}
    for folder in [root] + sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(folder.iterdir()):
            m = RESULT_FILE.match(f.name)
            if m and f.is_file():
                found.setdefault(folder.name, {})[int(m.group(1))] = f
    return found


RUN_KEYS = ("split", "classifier_sha256", "data_sha256", "max_length")


def check_same_run(results_dir: PathLike, files: Mapping[str, Mapping[int, Path]], split: str) -> None:
    """Refuse method folders that come from different pipeline runs (another
    classifier, split or data, as their ``run.json`` say) or from another
    split than the one scored: a stale folder would be tabled beside fresh
    ones.  Folders without ``run.json`` (hand-made results) are not checked."""
    seen: Dict[str, Tuple[str, dict]] = {}
    for method, by_k in files.items():
        folder = next(iter(by_k.values())).parent
        path = folder / "run.json"
        if not path.is_file():
            continue
        try:
            run = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(run, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise ERASERFormatError(f"{path}: unreadable ({exc})") from None
        if run.get("split") != split:
            raise ERASERFormatError(f"{folder}: rationales of the {run.get('split')!r} split, scored as {split!r}; "
                                    f"pass --split {run.get('split')}")
        key = {k: run.get(k) for k in RUN_KEYS}
        for other, (other_method, other_key) in seen.items():
            diff = [k for k in RUN_KEYS if key[k] != other_key[k]]
            if diff:
                raise ERASERFormatError(f"{results_dir}: {method} and {other_method} come from different runs "
                                        f"(differ in: {', '.join(diff)}); score them separately or rerun the "
                                        "stale method")
            break
        seen[str(path)] = (method, key)


def _method_order(names: Iterable[str]) -> List[str]:
    try:
        from modules.methods import METHOD_NAMES
    except ImportError:  # pragma: no cover - the registry is part of the project
        METHOD_NAMES = ()
    names = list(names)
    known = [m for m in METHOD_NAMES if m in names]
    return known + sorted(n for n in names if n not in known)


@dataclass(frozen=True)
class ScoringData:
    """A split's annotations with its documents: flattened tokens, and the sentence count of each."""

    annotations: List[Annotation]
    documents: Dict[str, List[str]]
    sentence_counts: Dict[str, int]

    @property
    def token_counts(self) -> Dict[str, int]:
        return {d: len(t) for d, t in self.documents.items()}


def load_scoring_data(data_dir: PathLike, split: str) -> ScoringData:
    """The ``split`` annotations of ``data_dir`` and their documents (an empty split is an error)."""
    annotations = load_split(data_dir, split)
    if not annotations:
        raise ERASERFormatError(f"the {split} split of {data_dir} is empty: nothing to score")
    sentences = load_documents(data_dir, {annotation_docid(a) for a in annotations})
    documents = {d: [t for sent in doc for t in sent] for d, doc in sentences.items()}
    check_evidence_offsets(annotations, documents)
    return ScoringData(annotations, documents, {d: len(doc) for d, doc in sentences.items()})


def full_scores(results: Sequence[dict], annotations: Sequence[Annotation], data: ScoringData, path: PathLike,
                iou_thresholds: Sequence[float] = eraser_scores.IOU_THRESHOLDS,
                aopc_thresholds: Sequence[float] = eraser_scores.AOPC_THRESHOLDS,
                notes: Optional[List[str]] = None) -> Dict[str, Any]:
    """Every score of the published ERASER script for validated ``results``,
    in its ``--score_file`` layout (:func:`BERT_rationale_benchmark.eraser_scores.score_file`)."""
    eraser_scores.check_fields(results, path, annotations, data.token_counts, data.sentence_counts, aopc_thresholds)
    return eraser_scores.score_file(results, annotations, data.token_counts, data.sentence_counts, iou_thresholds,
                                    aopc_thresholds, notes)


def score_results_dir_full(results_dir: PathLike, data_dir: PathLike, split: str, allow_subset: bool = False,
                           iou_thresholds: Sequence[float] = eraser_scores.IOU_THRESHOLDS,
                           aopc_thresholds: Sequence[float] = eraser_scores.AOPC_THRESHOLDS,
                           ) -> Tuple[Dict[str, Dict[int, TokenScores]], Dict[str, Dict[int, Dict[str, Any]]]]:
    """Token scores and every published ERASER score of each method and k
    under ``results_dir`` (see :func:`find_result_files`); each file must
    cover the whole split unless ``allow_subset`` (:func:`covered_annotations`)
    and carry complete fields (:func:`BERT_rationale_benchmark.eraser_scores.check_fields`)."""
    files = find_result_files(results_dir)
    if not files:
        raise FileNotFoundError(f"no identifier_results_<k>.json files in {results_dir} or its subfolders")
    check_same_run(results_dir, files, split)
    data = load_scoring_data(data_dir, split)
    table: Dict[str, Dict[int, TokenScores]] = {}
    full: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for method in _method_order(files):
        table[method], full[method] = {}, {}
        for k, p in sorted(files[method].items()):
            results = load_results(p, data.annotations, data.documents, split)
            covered = covered_annotations(results, data.annotations, p, split, allow_subset)
            table[method][k] = score_results(results, covered)
            full[method][k] = full_scores(results, covered, data, p, iou_thresholds, aopc_thresholds)
    return table, full


def score_results_dir(results_dir: PathLike, data_dir: PathLike, split: str,
                      allow_subset: bool = False) -> Dict[str, Dict[int, TokenScores]]:
    """Token scores of every method and k under ``results_dir`` (the first
    half of :func:`score_results_dir_full`)."""
    return score_results_dir_full(results_dir, data_dir, split, allow_subset)[0]


def format_table(table: Mapping[str, Mapping[int, TokenScores]], which: str = "macro") -> str:
    """A markdown table of ``which`` ("macro" or "micro") token F1 (%), one row
    per method, one column per k."""
    ks = sorted({k for row in table.values() for k in row})
    lines = [f"| {which} token F1 (%) | " + " | ".join(f"k={k}" for k in ks) + " |",
             "|---|" + "---:|" * len(ks)]
    for method, row in table.items():
        cells = [f"{100 * getattr(row[k], which).f1:.2f}" if k in row else "-" for k in ks]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(table: Mapping[str, Mapping[int, TokenScores]], out_dir: PathLike,
                stem: str = "token_f1") -> List[Path]:
    """Write the table as markdown (macro and micro F1), CSV and JSON (every
    figure) under ``out_dir``; returns the paths."""
    import io
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{stem}.md"
    cli.atomic_write_text(str(md), format_table(table, "macro") + "\n\n" + format_table(table, "micro") + "\n")
    rows = []
    for method, row in table.items():
        for k, s in sorted(row.items()):
            rows.append({"method": method, "k": k, "documents": s.documents,
                         "macro_precision": s.macro.precision, "macro_recall": s.macro.recall, "macro_f1": s.macro.f1,
                         "micro_precision": s.micro.precision, "micro_recall": s.micro.recall, "micro_f1": s.micro.f1,
                         "accuracy": s.accuracy})
    csv_path = out / f"{stem}.csv"
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["method", "k"])
    writer.writeheader()
    writer.writerows(rows)
    cli.atomic_write_text(str(csv_path), buffer.getvalue())
    json_path = out / f"{stem}.json"
    cli.atomic_write_json(str(json_path), rows)
    return [md, csv_path, json_path]


def plot_f1(table: Mapping[str, Mapping[int, TokenScores]], path: PathLike, title: str = "") -> Path:
    """PNG of token F1 against k for every method (macro solid, micro dashed),
    the paper's Movie Reviews figure."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (method, row) in enumerate(table.items()):
        ks = sorted(row)
        color = f"C{i % 10}"
        ax.plot(ks, [100 * row[k].macro.f1 for k in ks], marker="o", color=color, label=method)
        ax.plot(ks, [100 * row[k].micro.f1 for k in ks], linestyle="--", color=color, alpha=0.6)
    ax.set_xlabel("k (top-k words)")
    ax.set_ylabel("token F1 (%)  [macro solid, micro dashed]")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format="png")
    plt.close(fig)
    cli.atomic_write_bytes(str(path), buffer.getvalue())
    return Path(path)


def _get(scores: Mapping[str, Any], *path: Any) -> Optional[float]:
    node: Any = scores
    for key in path:
        if isinstance(node, list):
            node = node[key] if isinstance(key, int) and key < len(node) else None
        elif isinstance(node, Mapping):
            node = node.get(key)
        else:
            return None
        if node is None:
            return None
    return node if isinstance(node, (int, float)) else None


def _cell(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


ERASER_COLUMNS: Tuple[Tuple[str, Tuple[Any, ...]], ...] = (
    ("token F1", ("token_prf", "instance_macro", "f1")),
    ("IOU F1", ("iou_scores", 0, "macro", "f1")),
    ("token AUPRC", ("token_soft_metrics", "auprc")),
    ("sentence AUPRC", ("sentence_soft_metrics", "auprc")),
    ("comprehensiveness", ("classification_scores", "comprehensiveness")),
    ("sufficiency", ("classification_scores", "sufficiency")),
    ("AOPC comprehensiveness", ("classification_scores", "comprehensiveness_aopc")),
    ("AOPC sufficiency", ("classification_scores", "sufficiency_aopc")),
)
MORE_COLUMNS: Tuple[Tuple[str, Tuple[Any, ...]], ...] = (
    ("accuracy", ("classification_scores", "accuracy")),
    ("macro class F1", ("classification_scores", "prf", "macro avg", "f1-score")),
    ("token AP", ("token_soft_metrics", "average_precision")),
    ("token ROC AUC", ("token_soft_metrics", "roc_auc_score")),
    ("comp. entropy", ("classification_scores", "comprehensiveness_entropy")),
    ("comp. KL", ("classification_scores", "comprehensiveness_kl")),
    ("suff. entropy", ("classification_scores", "sufficiency_entropy")),
    ("suff. KL", ("classification_scores", "sufficiency_kl")),
)


def format_eraser_table(full: Mapping[str, Mapping[int, Mapping[str, Any]]], k: int,
                        columns: Sequence[Tuple[str, Tuple[Any, ...]]] = ERASER_COLUMNS) -> str:
    """A markdown table, one row per method, of the published scores of each
    method's ``identifier_results_<k>.json`` (fractions, as the ERASER paper
    prints them; "-" where the file lacks the field).  Token and IOU F1 are the
    macro figures (``instance_macro`` / IOU ``macro``, threshold 0.5);
    comprehensiveness and sufficiency remove / keep the top-k words; token
    AUPRC, sentence AUPRC and AOPC do not depend on k."""
    lines = [f"| method (k={k}) | " + " | ".join(name for name, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for method, by_k in full.items():
        scores = by_k.get(k, {})
        lines.append(f"| {method} | " + " | ".join(_cell(_get(scores, *path)) for _, path in columns) + " |")
    return "\n".join(lines)


def format_faithfulness_table(full: Mapping[str, Mapping[int, Mapping[str, Any]]]) -> str:
    """Comprehensiveness / sufficiency of the top-k words, one column per k
    (only the k whose files carry them: ``explain.faithfulness_k``)."""
    ks = sorted({k for row in full.values() for k, scores in row.items()
                 if _get(scores, "classification_scores", "comprehensiveness") is not None})
    if not ks:
        return "(no comprehensiveness / sufficiency in these files)"
    lines = ["| comprehensiveness / sufficiency | " + " | ".join(f"k={k}" for k in ks) + " |",
             "|---|" + "---:|" * len(ks)]
    for method, by_k in full.items():
        cells = [f"{_cell(_get(by_k.get(k, {}), 'classification_scores', 'comprehensiveness'), 2)} / "
                 f"{_cell(_get(by_k.get(k, {}), 'classification_scores', 'sufficiency'), 2)}" for k in ks]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _score_json(scores: Any) -> str:
    # the published script writes json.dump(scores, indent=4, sort_keys=True)
    return json.dumps(scores, indent=4, sort_keys=True, allow_nan=False) + "\n"


def write_score_file(path: PathLike, scores: Mapping[str, Any]) -> Path:
    """The scores of one results file, laid out as the published ``--score_file``."""
    cli.atomic_write_text(str(path), _score_json(scores))
    return Path(path)


def eraser_markdown(full: Mapping[str, Mapping[int, Mapping[str, Any]]], k: int) -> str:
    return (format_eraser_table(full, k) + "\n\n" + format_eraser_table(full, k, MORE_COLUMNS) + "\n\n"
            + format_faithfulness_table(full) + "\n")


def write_eraser_scores(full: Mapping[str, Mapping[int, Mapping[str, Any]]], out_dir: PathLike, k: int) -> List[Path]:
    """``eraser_scores.json`` (``{method: {k: published score-file dict}}``) and
    ``eraser_scores.md`` (the tables at ``k`` and per k) under ``out_dir``."""
    out = Path(out_dir)
    js, md = out / "eraser_scores.json", out / "eraser_scores.md"
    cli.atomic_write_text(str(js), _score_json({m: {str(kk): v for kk, v in row.items()} for m, row in full.items()}))
    cli.atomic_write_text(str(md), eraser_markdown(full, k))
    return [md, js]


def _flatten(scores: Any, prefix: str = "") -> List[Tuple[str, Any]]:
    if isinstance(scores, Mapping):
        return [x for key in sorted(scores) for x in _flatten(scores[key], f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(scores, list) and scores and isinstance(scores[0], Mapping) and "threshold" in scores[0]:
        return [x for item in scores for x in _flatten({k: v for k, v in item.items() if k != "threshold"},
                                                       f"{prefix}@{item['threshold']}")]
    return [(prefix, scores)]


def _print_single(path: PathLike, split: str, s: TokenScores, full: Mapping[str, Any]) -> None:
    print(f"{path}: {s.documents} documents ({split} split)")
    print(f"{'token-level':<12} {'precision':>9} {'recall':>9} {'F1':>9}")
    for name, v in (("macro", s.macro), ("micro", s.micro)):
        print(f"{name:<12} {v.precision:9.4f} {v.recall:9.4f} {v.f1:9.4f}")
    if s.accuracy is not None:
        print(f"classification accuracy: {s.accuracy:.4f}")
    print("\nevery score of the published ERASER scorer (its --score_file keys):")
    for key, value in _flatten(full):
        if ".prf." in f".{key}." and not key.startswith("classification_scores.prf.macro avg"):
            continue  # the per-class report is in the score file
        shown = "null" if value is None else (f"{value:.6f}" if isinstance(value, float) else
                                             ("[" + ", ".join(f"{x:.6f}" for x in value) + "]"
                                              if isinstance(value, list) else str(value)))
        print(f"  {key} = {shown}")


def _thresholds(values: Sequence[float], flag: str, low_open: bool) -> List[float]:
    if len(set(values)) != len(values):
        raise cli.CLIError(f"{flag} repeats a value: {list(values)}")
    for v in values:
        if not (math.isfinite(v) and (v > 0 if low_open else v >= 0) and v <= 1):
            raise cli.CLIError(f"{flag}: {v} is not in {'(0' if low_open else '[0'}, 1]")
    return list(values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Token-level precision / recall / F1 of top-k rationales against ERASER human evidence "
                    "(METHODS.md section 6), and every score of the published ERASER scorer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", "--data_dir", dest="data_dir", required=True,
                        help="ERASER directory with {train,val,test}.jsonl and docs/")
    parser.add_argument("--split", choices=SPLITS, default="test", help="split the results are scored on")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--results", help="one identifier_results_<k>.json file")
    group.add_argument("--results-dir", "--results_dir", dest="results_dir",
                       help="pipeline output folder: scores every <method>/identifier_results_<k>.json")
    parser.add_argument("--out-dir", default=None,
                        help="where --results-dir writes token_f1.{md,csv,json,png} and eraser_scores.{md,json} "
                             "(default: the results dir)")
    parser.add_argument("--score-file", "--score_file", dest="score_file", default=None,
                        help="with --results: write every score as JSON here, in the published --score_file layout")
    parser.add_argument("--iou-thresholds", "--iou_thresholds", dest="iou_thresholds", nargs="+", type=float,
                        default=list(eraser_scores.IOU_THRESHOLDS), help="IOU thresholds of the partial-match F1")
    parser.add_argument("--aopc-thresholds", "--aopc_thresholds", dest="aopc_thresholds", nargs="+", type=float,
                        default=list(eraser_scores.AOPC_THRESHOLDS),
                        help="AOPC bins (fractions of the words) read from thresholded_scores")
    parser.add_argument("--table-k", type=int, default=None,
                        help="with --results-dir: the k of the ERASER table's top-k columns (default: the smallest)")
    parser.add_argument("--allow-subset", action="store_true",
                        help="score results that cover only part of the split (only the documents present); "
                             "without it an incomplete results file is an error")
    return parser


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    try:
        iou = _thresholds(args.iou_thresholds, "--iou-thresholds", low_open=False)
        aopc = _thresholds(args.aopc_thresholds, "--aopc-thresholds", low_open=True)
        if args.results:
            if args.score_file:
                cli.check_output_file(args.score_file, flag="--score-file")
            data = load_scoring_data(args.data_dir, args.split)
            annotations = data.annotations
            results = load_results(args.results, annotations, data.documents, args.split)
            scored = covered_annotations(results, annotations, args.results, args.split, args.allow_subset)
            notes: List[str] = []
            full = full_scores(results, scored, data, args.results, iou, aopc, notes)
            s = score_results(results, scored)
            if len(scored) < len(annotations):
                print(f"--allow-subset: scoring {len(scored)} of {len(annotations)} documents of the "
                      f"{args.split} split")
            for note in notes:
                print(f"note: {note}")
            _print_single(args.results, args.split, s, full)
            if args.score_file:
                print(f"wrote {write_score_file(args.score_file, full)}")
            return 0
        out_dir = Path(args.out_dir or args.results_dir)
        if not Path(args.results_dir).is_dir():
            raise ERASERFormatError(f"--results-dir {args.results_dir}: not a directory")
        cli.check_output_dir(str(out_dir), flag="--out-dir")
        table, full = score_results_dir_full(args.results_dir, args.data_dir, args.split, args.allow_subset, iou, aopc)
        ks = sorted({k for row in table.values() for k in row})
        table_k = ks[0] if args.table_k is None else args.table_k
        if table_k not in ks:
            raise cli.CLIError(f"--table-k {table_k}: no identifier_results_{table_k}.json (have k = "
                               f"{', '.join(map(str, ks))})")
        n_docs = next(iter(next(iter(table.values())).values())).documents
        print(f"token-level rationale F1, {args.split} split, {n_docs} documents\n")
        print(format_table(table, "macro"))
        print()
        print(format_table(table, "micro"))
        print(f"\nERASER scores (the published scorer's definitions; fractions), {args.split} split\n")
        print(eraser_markdown(full, table_k), end="")
        paths = write_table(table, out_dir)
        paths.append(plot_f1(table, out_dir / "token_f1.png", title=f"ERASER token F1 vs k ({args.split})"))
        paths += write_eraser_scores(full, out_dir, table_k)
        print("\nwrote " + ", ".join(str(p) for p in paths))
        return 0
    except (ValueError, KeyError) as e:
        if isinstance(e, cli.input_error_types()):
            raise
        raise cli.CLIError(cli.one_line(e)) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Score; bad or incomplete input exits 2 with one line."""
    code = cli.run_main(_main, argv)
    if code:
        raise SystemExit(code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
