"""A document collection, cut into passages with one documented rule, and its content hash.

Sources
* a folder: every `*.txt` and `*.md` file under it (recursively, sorted by relative path); the document id is the
  path relative to the folder (`notes/visit.md`), the title is empty. Hidden files and folders are skipped.
  A single .txt/.md file is a collection of one document (id: its file name).
* a table: a `.jsonl` / `.csv` / `.json` / `.parquet` file read by `labscale.data.files.read_file`, with a text
  column (default `text`) and optional id and title columns. Without an id column a row's id is its 0-based row
  number. Rows whose text is empty are skipped; ids must be unique.
* in memory: `Collection(name, documents)` with `Document`s (what builtin tasks use).

Chunking rule (`max_words`, `overlap`; words are maximal runs of non-whitespace, so a word is never split)
1. A document is cut into paragraphs at blank lines; whitespace inside a paragraph collapses to single spaces.
2. A paragraph longer than `max_words` words is cut into windows of `max_words` words that start every
   `max_words - overlap` words (consecutive windows share `overlap` words); the last window ends at the paragraph's
   last word, so no word is dropped.
3. The pieces are then packed in order: consecutive pieces join (separated by a blank line) while the passage
   stays within `max_words` words. Overlap only happens inside a long paragraph: paragraph breaks are natural cuts.
Passage ids are `<doc id>#<k>`, k counting from 0 within the document. A document with no words has no passages.

The collection hash is `labscale.hashing.sha` of the chunking version and parameters and every document's id,
title and text (in order): the same documents chunked the same way hash the same on every machine, and any change
to a document or to the rule gives a new hash (and so a new cached index, see index.py).

Errors (one line with a hint): a missing folder or file, a folder without .txt/.md files, a non-UTF-8 file, a
missing text/id/title column, duplicate ids, and a collection without a single word.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from labscale.errors import ConfigError, DataError
from labscale.hashing import sha

__all__ = ["CHUNKING_VERSION", "DEFAULT_MAX_WORDS", "DEFAULT_OVERLAP", "Collection", "Document", "Passage",
           "chunk_text", "load_collection"]

CHUNKING_VERSION = 1  # bump when the rule above changes: it is part of the collection hash
DEFAULT_MAX_WORDS = 150  # ~200 word-pieces: under all-MiniLM-L6-v2's 256-token input limit, so dense sees it all
DEFAULT_OVERLAP = 30
FOLDER_SUFFIXES = (".txt", ".md")

_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    title: str = ""


@dataclass(frozen=True)
class Passage:
    """One retrievable unit: a chunk of a document. `index` is its position in the collection's passage list."""

    id: str
    doc_id: str
    text: str
    title: str = ""
    index: int = 0


def _check_params(max_words: int, overlap: int) -> None:
    if max_words < 1:
        raise ConfigError(f"chunk size max_words={max_words} must be at least 1", "use e.g. 150")
    if not 0 <= overlap < max_words:
        raise ConfigError(f"chunk overlap {overlap} must be >= 0 and smaller than max_words={max_words}",
                          f"use e.g. overlap={max(0, max_words // 5)}")


def chunk_text(text: str, max_words: int = DEFAULT_MAX_WORDS, overlap: int = DEFAULT_OVERLAP) -> list[str]:
    """The passages of one document's text by the rule in the module docstring."""
    _check_params(max_words, overlap)
    pieces: list[list[str]] = []
    stride = max_words - overlap
    for paragraph in _PARAGRAPH_BREAK.split(text):
        words = paragraph.split()
        if not words:
            continue
        if len(words) <= max_words:
            pieces.append(words)
            continue
        start = 0
        while True:
            pieces.append(words[start : start + max_words])
            if start + max_words >= len(words):
                break
            start += stride
    passages: list[list[list[str]]] = []
    size = 0
    for piece in pieces:
        if passages and size + len(piece) <= max_words:
            passages[-1].append(piece)
            size += len(piece)
        else:
            passages.append([piece])
            size = len(piece)
    return ["\n\n".join(" ".join(p) for p in group) for group in passages]


@dataclass(eq=False)
class Collection:
    """Documents plus the chunking parameters; `passages` and `hash` are computed once, on first use."""

    name: str
    documents: tuple[Document, ...]
    max_words: int = DEFAULT_MAX_WORDS
    overlap: int = DEFAULT_OVERLAP
    source: str = ""  # where the documents came from, for messages and the report
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_params(self.max_words, self.overlap)
        self.documents = tuple(self.documents)
        seen: set[str] = set()
        for d in self.documents:
            if d.id in seen:
                raise DataError(f"collection '{self.name}' has duplicate document id '{d.id}'",
                                "give every document a unique id")
            seen.add(d.id)

    @cached_property
    def passages(self) -> tuple[Passage, ...]:
        out: list[Passage] = []
        for d in self.documents:
            for k, text in enumerate(chunk_text(d.text, self.max_words, self.overlap)):
                out.append(Passage(f"{d.id}#{k}", d.id, text, d.title, len(out)))
        if not out:
            where = f" ({self.source})" if self.source else ""
            raise DataError(f"collection '{self.name}'{where} is empty: its documents hold no text",
                            "add documents with text, or point at the right folder or file")
        return tuple(out)

    @cached_property
    def hash(self) -> str:
        return sha({
            "chunking": CHUNKING_VERSION, "max_words": self.max_words, "overlap": self.overlap,
            "documents": [[d.id, d.title, d.text] for d in self.documents],
        })

    @cached_property
    def _by_id(self) -> dict[str, Passage]:
        return {p.id: p for p in self.passages}

    def passage(self, passage_id: str) -> Passage:
        try:
            return self._by_id[passage_id]
        except KeyError:
            raise DataError(f"collection '{self.name}' has no passage '{passage_id}'",
                            "passage ids are '<document id>#<k>'") from None

    def info(self) -> dict:
        """Summary for the report and provenance."""
        return {"name": self.name, "source": self.source, "hash": self.hash, "documents": len(self.documents),
                "passages": len(self.passages), "max_words": self.max_words, "overlap": self.overlap,
                "chunking_version": CHUNKING_VERSION}


# -- readers ---------------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"collection file '{path}' is not valid UTF-8 ({e.reason} at byte {e.start})",
                        "save it as UTF-8") from None


def from_folder(folder: Path, *, name: str | None = None, max_words: int = DEFAULT_MAX_WORDS,
                overlap: int = DEFAULT_OVERLAP) -> Collection:
    folder = Path(folder)
    files = sorted(
        (p for p in folder.rglob("*") if p.suffix.lower() in FOLDER_SUFFIXES and p.is_file()
         and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    if not files:
        raise DataError(f"collection folder '{folder}' has no .txt or .md files",
                        "put the documents there as UTF-8 .txt or .md files")
    docs = tuple(Document(p.relative_to(folder).as_posix(), _read_text(p)) for p in files)
    return Collection(name or folder.name, docs, max_words, overlap, source=str(folder))


def from_table(path: Path, *, text_column: str = "text", id_column: str | None = None,
               title_column: str | None = None, name: str | None = None, max_words: int = DEFAULT_MAX_WORDS,
               overlap: int = DEFAULT_OVERLAP) -> Collection:
    from labscale.data.files import is_missing, read_file

    path = Path(path)
    rows = read_file(path)
    if not rows:
        raise DataError(f"collection file '{path}' has no rows", "add one row per document")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    for role, column in (("text", text_column), ("id", id_column), ("title", title_column)):
        if column is not None and column not in columns:
            raise DataError(f"collection file '{path}' has no {role} column '{column}'",
                            f"its columns are: {', '.join(columns)}")

    def cell(row: dict, column: str) -> str:
        value = row.get(column)
        return "" if value is None or is_missing(value) else str(value)

    docs = []
    for i, row in enumerate(rows):
        text = cell(row, text_column)
        if not text.strip():
            continue
        doc_id = cell(row, id_column).strip() if id_column else str(i)
        if not doc_id:
            raise DataError(f"collection file '{path}' row {i} has an empty id in column '{id_column}'",
                            "give every row an id")
        docs.append(Document(doc_id, text, cell(row, title_column).strip() if title_column else ""))
    return Collection(name or path.stem, tuple(docs), max_words, overlap, source=str(path))


def load_collection(source: str | Path, base_dir: Path | None = None, *, text_column: str = "text",
                    id_column: str | None = None, title_column: str | None = None, name: str | None = None,
                    max_words: int = DEFAULT_MAX_WORDS, overlap: int = DEFAULT_OVERLAP) -> Collection:
    """A collection from a folder of .txt/.md files or a table file; a relative `source` resolves against
    `base_dir` (the experiment file's folder). The passages are chunked (and emptiness checked) here, so a bad
    collection fails before anything else runs."""
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.exists():
        raise DataError(f"collection '{source}' does not exist (looked for {path})",
                        "name a folder of .txt/.md files or a .jsonl/.csv file (relative to the experiment file)")
    if path.is_dir() or path.suffix.lower() in FOLDER_SUFFIXES:
        if text_column != "text" or id_column or title_column:
            raise ConfigError(f"collection '{source}' is not a table: text/id/title columns apply to table files only",
                              "drop the column options, or point at a .jsonl/.csv file")
        if path.is_dir():
            collection = from_folder(path, name=name, max_words=max_words, overlap=overlap)
        else:
            collection = Collection(name or path.stem, (Document(path.name, _read_text(path)),), max_words, overlap,
                                    source=str(path))
    else:
        collection = from_table(path, text_column=text_column, id_column=id_column, title_column=title_column,
                                name=name, max_words=max_words, overlap=overlap)
    collection.passages  # noqa: B018 - raise the empty-collection error now
    return collection
