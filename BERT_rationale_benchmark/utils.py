"""Readers and writers for the ERASER data format (../shared/METHODS.md section 6).

An ERASER data directory holds ``train.jsonl``, ``val.jsonl`` and
``test.jsonl`` (one annotation a line) and ``docs/`` (one document per file,
named by its docid; one sentence a line, tokens separated by spaces).  Token
offsets of evidence spans count over the document's tokens flattened across
sentences; ``start_token`` is inclusive and ``end_token`` exclusive.

Tokenisation follows the ERASER reference code: empty lines are dropped and
each line is split on single spaces with empty strings removed, so offsets
agree with the published annotations.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union

__all__ = [
    "SPLITS", "ERASERFormatError", "MissingDocumentError", "Evidence", "Annotation",
    "load_jsonl", "write_jsonl", "annotations_from_jsonl", "load_split", "load_datasets",
    "load_documents", "load_flattened_documents", "annotation_docid", "check_evidence_offsets",
]

PathLike = Union[str, "os.PathLike[str]"]

SPLITS: Tuple[str, ...] = ("train", "val", "test")


class ERASERFormatError(ValueError):
    """A file of an ERASER directory does not follow the format; the message
    names the file (and line, for JSON lines files)."""


class MissingDocumentError(ERASERFormatError):
    """A docid is referenced but no such document exists; the message names it."""


@dataclass(frozen=True)
class Evidence:
    """One human rationale span: tokens ``[start_token, end_token)`` of document ``docid``."""

    docid: str
    start_token: int
    end_token: int
    text: str = ""
    start_sentence: int = -1
    end_sentence: int = -1

    def tokens(self) -> range:
        """The token indices the span covers."""
        return range(self.start_token, self.end_token)


@dataclass(frozen=True)
class Annotation:
    """One line of ``{train,val,test}.jsonl``.

    ``evidences`` keeps the file's grouping: a tuple of evidence groups, each
    a tuple of :class:`Evidence` (Movie Reviews has one span per group).
    """

    annotation_id: str
    classification: str
    evidences: Tuple[Tuple[Evidence, ...], ...]
    query: str = ""
    query_type: Optional[str] = None
    docids: Optional[Tuple[str, ...]] = None

    def all_evidences(self) -> Tuple[Evidence, ...]:
        """Every evidence span, groups flattened, in file order."""
        return tuple(chain.from_iterable(self.evidences))

    def evidence_tokens(self) -> Dict[str, Set[int]]:
        """The set of human-rationale token indices, per docid."""
        out: Dict[str, Set[int]] = {}
        for ev in self.all_evidences():
            out.setdefault(ev.docid, set()).update(ev.tokens())
        return out


def _where(path: PathLike, line: Optional[int] = None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def load_jsonl(path: PathLike) -> List[Dict[str, Any]]:
    """Every non-empty line of a JSON lines file, parsed.

    Raises
    ------
    ERASERFormatError
        For a line that is not a JSON object, naming the file and line number.
    FileNotFoundError
        When the file does not exist.
    """
    return [record for _, record in _jsonl_objects(path)]


def _jsonl_objects(path: PathLike) -> List[Tuple[str, Dict[str, Any]]]:
    """(``file:line``, parsed object) for every non-empty line; see :func:`load_jsonl`."""
    out = []
    with open(path, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = _where(path, lineno)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ERASERFormatError(f"{where}: malformed JSON line ({e.msg})") from None
            if not isinstance(record, dict):
                raise ERASERFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
            out.append((where, record))
    return out


def write_jsonl(records: Iterable[Dict[str, Any]], path: PathLike) -> None:
    """Write one JSON object a line (creating parent directories)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _as_int(value: Any, field: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ERASERFormatError(f"{where}: {field} must be an integer, got {value!r}")
    return value


def _check_docid(value: Any, field: str, where: str) -> str:
    """A docid names a file of ``docs/``: a non-empty string without a path separator."""
    if not isinstance(value, str):
        raise ERASERFormatError(f"{where}: {field} must be a string, got {value!r}")
    if value in ("", ".", "..") or "/" in value or "\\" in value or "\0" in value:
        raise ERASERFormatError(f"{where}: {field} {value!r} is not a file name of docs/ (empty, '.', '..' or "
                                "a path separator)")
    return value


def _evidence_from_dict(d: Any, where: str, field: str = "evidence") -> Evidence:
    if not isinstance(d, dict):
        raise ERASERFormatError(f"{where}: {field} must be an object, got {d!r}")
    for name in ("docid", "start_token", "end_token"):
        if name not in d:
            raise ERASERFormatError(f"{where}: {field} lacks field {name!r}")
    docid = _check_docid(d["docid"], f"{field}.docid", where)
    start = _as_int(d["start_token"], f"{field}.start_token", where)
    end = _as_int(d["end_token"], f"{field}.end_token", where)
    if start < 0:
        raise ERASERFormatError(f"{where}: {field}.start_token: {start} < 0 (not 0 <= start <= end)")
    if end < start:
        raise ERASERFormatError(f"{where}: {field}.end_token: {end} < start_token {start} (not 0 <= start <= end)")
    text = d.get("text")
    if text is None:
        text = ""
    elif not isinstance(text, str):
        if not isinstance(text, list):
            raise ERASERFormatError(f"{where}: {field}.text must be a string or a list of tokens, got {text!r}")
        text = " ".join(map(str, text))
    return Evidence(
        docid=docid, start_token=start, end_token=end, text=text,
        start_sentence=_optional_int(d.get("start_sentence"), f"{field}.start_sentence", where),
        end_sentence=_optional_int(d.get("end_sentence"), f"{field}.end_sentence", where),
    )


def _optional_int(value: Any, field: str, where: str) -> int:
    """An optional evidence index: absent or ``null`` (ERASER writes both) is -1."""
    return -1 if value is None else _as_int(value, field, where)


def _annotation_from_dict(d: Dict[str, Any], where: str) -> Annotation:
    """One annotation line, every field checked; a message names the field
    (``evidences[g][i].end_token``) after ``file:line``."""
    for field in ("annotation_id", "classification"):
        if field not in d:
            raise ERASERFormatError(f"{where}: annotation lacks field {field!r}")
        if not isinstance(d[field], str):
            raise ERASERFormatError(f"{where}: {field} must be a string, got {d[field]!r}")
    raw = d.get("evidences") or []
    if not isinstance(raw, list):
        raise ERASERFormatError(f"{where}: evidences must be a list, got {raw!r}")
    groups = []
    for g, group in enumerate(raw):
        # ERASER writes a list of groups; a bare evidence object is a group of one
        if isinstance(group, list):
            groups.append(tuple(_evidence_from_dict(e, where, f"evidences[{g}][{i}]") for i, e in enumerate(group)))
        else:
            groups.append((_evidence_from_dict(group, where, f"evidences[{g}]"),))
    docids = d.get("docids")
    if docids is not None:
        if not isinstance(docids, list):
            raise ERASERFormatError(f"{where}: docids must be a list of strings or null, got {docids!r}")
        docids = tuple(_check_docid(x, f"docids[{i}]", where) for i, x in enumerate(docids))
    query = d.get("query") or ""
    query_type = d.get("query_type")
    if query_type is not None and not isinstance(query_type, str):
        raise ERASERFormatError(f"{where}: query_type must be a string or null, got {query_type!r}")
    return Annotation(
        annotation_id=d["annotation_id"], classification=d["classification"], evidences=tuple(groups),
        query=query if isinstance(query, str) else str(query), query_type=query_type, docids=docids,
    )


def annotations_from_jsonl(path: PathLike) -> List[Annotation]:
    """The annotations of one split file, as :class:`Annotation` records.

    Raises
    ------
    ERASERFormatError
        For a malformed line or a record missing required fields, naming
        the file and line number; also for a repeated annotation id.
    """
    out: List[Annotation] = []
    seen: Dict[str, str] = {}
    for where, record in _jsonl_objects(path):
        ann = _annotation_from_dict(record, where)
        if ann.annotation_id in seen:
            first_line = seen[ann.annotation_id].rsplit(":", 1)[1]
            raise ERASERFormatError(f"{where}: annotation id {ann.annotation_id!r} repeats line {first_line}")
        seen[ann.annotation_id] = where
        out.append(ann)
    return out


def load_split(data_dir: PathLike, split: str) -> List[Annotation]:
    """The annotations of ``data_dir/<split>.jsonl``."""
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no {split} split: {path} does not exist")
    return annotations_from_jsonl(path)


def load_datasets(data_dir: PathLike) -> Tuple[List[Annotation], List[Annotation], List[Annotation]]:
    """The train, val and test annotations of an ERASER directory."""
    train, val, test = (load_split(data_dir, s) for s in SPLITS)
    return train, val, test


def _tokenize_lines(text: str) -> List[List[str]]:
    # as the ERASER reference reader: drop empty lines, split on single spaces, drop empty tokens
    lines = [line.strip() for line in text.splitlines()]
    return [[t for t in line.split(" ") if t] for line in lines if line]


def _read_document(path: Path) -> str:
    """A document's text; a file that is not UTF-8 is an :class:`ERASERFormatError` naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ERASERFormatError(f"{path}: not UTF-8 text (byte {e.start})") from None


def load_documents(data_dir: PathLike, docids: Optional[Iterable[str]] = None) -> Dict[str, List[List[str]]]:
    """Documents as sentences of tokens, keyed by docid.

    Reads ``data_dir/docs/<docid>``; a directory without ``docs/`` but with
    ``docs.jsonl`` (lines ``{"docid": ..., "document": text}``) is read from
    that instead.  ``docids=None`` loads every document.

    Raises
    ------
    MissingDocumentError
        When a requested docid has no document, naming the docid.
    """
    data_dir = Path(data_dir)
    docs_dir = data_dir / "docs"
    wanted = None if docids is None else sorted(set(docids))
    out: Dict[str, List[List[str]]] = {}
    if docs_dir.is_dir():
        names = wanted if wanted is not None else sorted(p.name for p in docs_dir.iterdir() if p.is_file())
        for docid in names:
            path = docs_dir / docid
            if not path.is_file():
                raise MissingDocumentError(f"document {docid!r} not found: {path} does not exist")
            out[docid] = _tokenize_lines(_read_document(path))
        return out
    jsonl = data_dir / "docs.jsonl"
    if not jsonl.is_file():
        raise FileNotFoundError(f"{data_dir} has neither a docs/ directory nor docs.jsonl")
    texts: Dict[str, str] = {}
    for where, record in _jsonl_objects(jsonl):
        for field in ("docid", "document"):
            if not isinstance(record.get(field), str):
                raise ERASERFormatError(f"{where}: {field} must be a string, got {record.get(field)!r}")
        if record["docid"] in texts:
            raise ERASERFormatError(f"{where}: docid {record['docid']!r} repeats an earlier record")
        texts[record["docid"]] = record["document"]
    for docid in (wanted if wanted is not None else sorted(texts)):
        if docid not in texts:
            raise MissingDocumentError(f"document {docid!r} not found in {jsonl}")
        out[docid] = _tokenize_lines(texts[docid])
    return out


def load_flattened_documents(data_dir: PathLike, docids: Optional[Iterable[str]] = None) -> Dict[str, List[str]]:
    """Documents as one token list each (sentences concatenated): the
    coordinates of evidence offsets."""
    return {d: list(chain.from_iterable(s)) for d, s in load_documents(data_dir, docids).items()}


def annotation_docid(ann: Annotation) -> str:
    """The one document an annotation is about: its ``docids`` if given,
    else its evidences' docid, else its annotation id (Movie Reviews names
    the document after the annotation).

    Raises
    ------
    ERASERFormatError
        When the annotation refers to more than one document.
    """
    ids: Sequence[str]
    if ann.docids:
        ids = sorted(set(ann.docids))
    else:
        ids = sorted({ev.docid for ev in ann.all_evidences()}) or [ann.annotation_id]
    if len(ids) != 1:
        raise ERASERFormatError(
            f"annotation {ann.annotation_id!r} refers to {len(ids)} documents ({', '.join(ids)}); "
            "only single-document tasks such as Movie Reviews are supported")
    return ids[0]


def check_evidence_offsets(annotations: Iterable[Annotation], documents: Dict[str, Sequence[str]]) -> None:
    """Check that every evidence span lies inside its (flattened) document.

    Raises
    ------
    MissingDocumentError
        For an evidence whose docid is not in ``documents``.
    ERASERFormatError
        For a span past the end of its document, naming the annotation.
    """
    for ann in annotations:
        for ev in ann.all_evidences():
            if ev.docid not in documents:
                raise MissingDocumentError(f"document {ev.docid!r} (annotation {ann.annotation_id!r}) not loaded")
            n = len(documents[ev.docid])
            if ev.end_token > n:
                raise ERASERFormatError(
                    f"annotation {ann.annotation_id!r}: evidence [{ev.start_token}, {ev.end_token}) "
                    f"past the end of document {ev.docid!r} ({n} tokens)")
