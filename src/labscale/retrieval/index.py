"""Retriever registry and the on-disk index cache: an index is built once per (collection, retriever) and reused.

    retriever = load_index(collection, "dense")
    retriever.search(["is the sky blue"], k=3)  # -> [[Hit(passage_id, doc_id, score, text, title, rank), ...]]

Cache location: `labscale_home()/indexes/<collection hash[:16]>-<retriever>-<version[:8]>/`, where `version` is
the sha of the retriever's `version()` (storage format, library versions, and for dense the model package), so an
upgrade that could change scores builds a new index instead of reading a stale one. The folder holds the
retriever's files and `manifest.json` (collection info and hash, retriever, version, passage-id digest, build
time). It is built in a temporary folder beside it and renamed into place, so a process killed mid-build leaves
no partial index; two processes building the same index both succeed (the second rename loses and its copy is
dropped). A folder whose manifest does not match the collection, or that fails to load, is rebuilt.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from labscale.errors import ConfigError
from labscale.hashing import sha
from labscale.retrieval.base import Retriever
from labscale.retrieval.collection import Collection

__all__ = ["RETRIEVERS", "check_retriever", "index_dir", "load_index", "retriever_names"]

# Registry name -> "module:class" (imported on first use, so `labscale --help` stays fast).
RETRIEVERS: dict[str, str] = {
    "bm25": "labscale.retrieval.bm25:BM25Index",
    "dense": "labscale.retrieval.dense:DenseIndex",
}
MANIFEST = "manifest.json"


def retriever_names() -> list[str]:
    return list(RETRIEVERS)


def check_retriever(name: str) -> str:
    """`name` if it is a registered retriever, else a one-line ConfigError with a did-you-mean. Cheap: imports
    nothing, so the config layer can validate before anything runs."""
    if name in RETRIEVERS:
        return name
    close = difflib.get_close_matches(str(name).lower(), RETRIEVERS, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(f"unknown retriever '{name}'", f"{hint}use one of: {', '.join(RETRIEVERS)}")


def _class(name: str):
    module, _, cls = RETRIEVERS[check_retriever(name)].partition(":")
    return getattr(importlib.import_module(module), cls)


def _version_key(cls) -> str:
    return sha(cls.version())[:8]


def index_dir(collection: Collection, name: str) -> Path:
    """Where the index of `collection` by retriever `name` is (or will be) stored."""
    from labscale.home import labscale_home

    cls = _class(name)
    return labscale_home() / "indexes" / f"{collection.hash[:16]}-{name}-{_version_key(cls)}"


def _manifest(collection: Collection, name: str, cls, build_s: float, extra: dict) -> dict:
    return {"retriever": name, "version": cls.version(), "collection": collection.info(),
            "passage_ids_sha": sha([p.id for p in collection.passages]), "build_s": round(build_s, 3),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}


def _valid(manifest: dict, collection: Collection, name: str, cls) -> bool:
    return (manifest.get("retriever") == name and manifest.get("version") == cls.version()
            and manifest.get("collection", {}).get("hash") == collection.hash
            and manifest.get("passage_ids_sha") == sha([p.id for p in collection.passages]))


def _try_load(folder: Path, collection: Collection, name: str, cls):
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if not _valid(manifest, collection, name, cls):
            return None
        index = cls.load(folder, collection)
    except (OSError, ValueError, KeyError, TypeError):  # missing, partial or foreign files: rebuild
        return None
    index.manifest, index.reused = manifest, True
    return index


def load_index(collection: Collection, name: str = "bm25", *, rebuild: bool = False) -> Retriever:
    """The retriever `name` over `collection`: read from the cache when a valid index is stored, else built and
    stored. The returned object has `search(queries, k)`, `manifest` (what was stored) and `reused` (True when
    nothing was recomputed)."""
    cls = _class(name)
    folder = index_dir(collection, name)
    if not rebuild and folder.is_dir():
        index = _try_load(folder, collection, name, cls)
        if index is not None:
            return index
    start = time.perf_counter()
    index = cls.build(collection)
    extra = index.manifest_extra() if hasattr(index, "manifest_extra") else {}
    manifest = _manifest(collection, name, cls, time.perf_counter() - start, extra)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", suffix=".tmp", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the index is as private as any other cache file
    try:
        index.save(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if folder.exists():  # stale or corrupt: move it aside first (rename over a non-empty folder fails)
            trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", suffix=".old", dir=folder.parent))
            try:
                os.replace(folder, trash / "index")
            except OSError:
                pass
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process stored the same index first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    index.manifest, index.reused = manifest, False
    return index
