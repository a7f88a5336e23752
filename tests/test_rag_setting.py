"""The rag:K setting: parsing, the numbered-passages prompt, retrieval in the planner (one index per collection and
retriever, shared by models), passage ids stored with each prediction, retrieval scores equal to a direct
computation, the report's closed-book vs rag:K table, every bad input's one-line error — and, on the real
embedded model and the packaged MiniLM, the same end to end with the index reused on a second run."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from helpers import cli, counts, dump, write_experiment

from labscale.errors import ConfigError
from labscale.example import Example
from labscale.retrieval import Hit

DOCS = {
    "nile.md": "The Nile is the longest river in Africa. It flows north into the Mediterranean Sea.",
    "etna.md": "Mount Etna is an active volcano on the island of Sicily.",
    "cats.md": "Cats are small domesticated felines that purr and chase mice.",
    "piano.md": "A piano is a keyboard instrument whose strings are struck by felt hammers.",
}
QUESTIONS = [  # question, answer, gold document
    ("does the nile flow into the mediterranean sea", "yes", "nile.md"),
    ("is mount etna on sicily", "yes", "etna.md"),
    ("do cats chase mice", "yes", "cats.md"),
    ("are piano strings struck by hammers", "yes", "piano.md"),
    ("is the nile in asia", "no", "nile.md"),
    ("is etna an extinct volcano", "no", "etna.md"),
]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LABSCALE_HOME", str(tmp_path / "home"))
    from labscale.engine import plan

    monkeypatch.setattr(plan, "_INDEXES", {})  # a fresh process: indexes come from the on-disk cache
    monkeypatch.setattr(plan, "_HITS", {})
    return tmp_path / "home"


@pytest.fixture
def kb(tmp_path):
    """A folder collection and a yes/no user task over it, naming each question's gold document."""
    (tmp_path / "docs").mkdir()
    for name, text in DOCS.items():
        (tmp_path / "docs" / name).write_text(text)
    lines = ["question,answer,gold"] + [f"{q},{a},{g}" for q, a, g in QUESTIONS]
    (tmp_path / "qa.csv").write_text("\n".join(lines) + "\n")
    return {"name": "kbqa", "data": "qa.csv", "type": "classify", "input": "Question: {{ question }}?",
            "target": "answer", "labels": ["yes", "no"], "instruction": "Answer yes or no.",
            "split_fractions": [0, 0, 1], "collection": {"path": "docs"}, "gold_passage": "gold"}


def _rows(db: Path, sql: str) -> list:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


# -- parsing and the prompt ------------------------------------------------------------------------------------


def test_parse_rag_settings():
    from labscale.settings.setting import parse_setting

    s = parse_setting("rag:3")
    assert (s.kind, s.passages, s.retriever, s.deferred) == ("rag", 3, "bm25", False)
    assert parse_setting("rag:2:dense").retriever == "dense"
    for bad, message in (("rag:0", "retrieval needs k >= 1 passages per query, got 0 — use e.g. rag:3"),
                         ("rag:-2", "got -2"), ("rag:3:bm52", "unknown retriever 'bm52' — did you mean 'bm25'?"),
                         ("rag", "write rag:K or rag:K:<retriever>"), ("rag:x", "write rag:K"),
                         ("rag:1:dense:x", "write rag:K")):
        with pytest.raises(ConfigError) as e:
            parse_setting(bad)
        assert message in str(e.value) and "\n" not in str(e.value), (bad, str(e.value))


def test_the_passages_block_is_numbered_and_goes_before_the_task_prompt():
    from labscale.settings.setting import chat_prompt, loglikelihood_prompt, parse_setting
    from labscale.tasks.base import Task

    task = Task("t", "t", "classify", "Answer yes or no.", ["accuracy"], "accuracy", "s", "l",
                lambda: [Example("a", "Question: is the nile long?", "yes")], labels=("yes", "no"))
    hits = [Hit("nile.md#0", "nile.md", 3.0, "The Nile is long.", "Nile"), Hit("x#0", "x", 1.0, "Other text.")]
    ex = task.examples[0]
    (msg,) = chat_prompt(task, parse_setting("rag:2"), ex, 0, passages=hits)
    assert msg["content"] == ("Passages:\n[1] Nile\nThe Nile is long.\n\n[2] Other text.\n\n"
                              "Answer yes or no.\n\nQuestion: is the nile long?")
    closed = chat_prompt(task, parse_setting("zero-shot"), ex, 0)[0]["content"]
    assert msg["content"].endswith(closed)  # the closed-book prompt, with the passages before it
    mc = Task("m", "m", "multiple_choice", "", ["acc"], "acc", "s", "l",
              lambda: [Example("q", "Which is long?", "Nile", ("Nile", "Tiber"), 0)])
    context, continuations = loglikelihood_prompt(mc, parse_setting("rag:2"), mc.examples[0], 0, passages=hits)
    assert context.startswith("Passages:\n[1] Nile") and context.endswith("\n\nWhich is long?")
    assert continuations == [" Nile", " Tiber"]


# -- end to end on the tiny model -----------------------------------------------------------------------------


@pytest.mark.slow
def test_rag_run_stores_passages_and_scores_retrieval(tmp_path, kb, tiny_llm, capsys, monkeypatch):
    from labscale.metrics.retrieval import recall_at_k, reciprocal_rank
    from labscale.retrieval import load_collection, load_index, query_for

    exp = write_experiment(tmp_path / "rag.yaml", name="rag", models=[f"hf:{tiny_llm}"], tasks=[kb],
                           settings=["zero-shot", "rag:2"], generation={"max_new_tokens": 3})
    db = tmp_path / "rag.db"
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
    assert code == 0, err
    rows = _rows(db, "SELECT r.setting, p.example_id, p.prompt, p.retrieved_json FROM predictions p "
                     "JOIN runs r ON r.id = p.run_id ORDER BY r.setting, p.position")
    closed = [r for r in rows if r[0] == "zero-shot"]
    rag = [r for r in rows if r[0] == "rag:2"]
    assert len(rag) == 6 and all(r[3] is None for r in closed)
    assert all("Passages:\n[1] " in r[2] and "\n\n[2] " in r[2] for r in rag)
    # the stored passages are what the retriever returns for the query, best first
    collection = load_collection("docs", tmp_path)
    retriever = load_index(collection, "bm25")
    gold = {str(i): g for i, (_, _, g) in enumerate(QUESTIONS)}
    stored = {r[1]: [pid for pid, _ in json.loads(r[3])] for r in rag}
    for i, (q, _, _) in enumerate(QUESTIONS):
        hits = retriever.search([query_for(Example(str(i), f"Question: {q}?", "yes"))], 2)[0]
        assert stored[str(i)] == [h.passage_id for h in hits]
    # recall@K and MRR equal a direct computation from the stored ids and the gold documents
    direct_recall = sum(any(p.split("#")[0] == gold[i] for p in ids) for i, ids in stored.items()) / 6
    direct_mrr = sum(next((1 / r for r, p in enumerate(ids, 1) if p.split("#")[0] == gold[i]), 0.0)
                     for i, ids in stored.items()) / 6
    scores = dict(_rows(db, "SELECT s.metric, s.value FROM scores s JOIN runs r ON r.id = s.run_id "
                            "WHERE r.setting = 'rag:2'"))
    assert scores["recall_at_k"] == pytest.approx(direct_recall) and scores["mrr"] == pytest.approx(direct_mrr)
    assert recall_at_k([Hit(p, p.split("#")[0], 0, "") for p in stored["0"]], ["nile.md"]) == 1.0
    assert reciprocal_rank([Hit(p, p.split("#")[0], 0, "") for p in stored["0"]], ["nile.md"]) == 1.0
    # the run record names the index; the report compares closed-book with rag:2 on the same examples
    info = json.loads(_rows(db, "SELECT task_json FROM runs WHERE setting = 'rag:2'")[0][0])["retrieval"]
    assert info["retriever"] == "bm25" and info["collection"]["hash"] == collection.hash and info["k"] == 2
    report = (tmp_path / "rag.md").read_text()
    assert "## Retrieval" in report and "### Closed-book vs rag:K" in report
    assert "4 docs / 4 passages" in report
    # a changed document is another collection: another run (the first stays stored)
    (tmp_path / "docs" / "cats.md").write_text("Cats are felines.")
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
    assert code == 0 and counts(out)[0] > 0
    assert len(_rows(db, "SELECT id FROM runs WHERE setting = 'rag:2'")) == 2


@pytest.mark.slow
def test_the_index_is_built_once_per_collection_and_shared_by_models(tmp_path, kb, tiny_llm, capsys, monkeypatch):
    from labscale.retrieval import bm25

    built = []
    real = bm25.BM25Index.build.__func__

    def counting(cls, collection):
        built.append(collection.hash)
        return real(cls, collection)

    monkeypatch.setattr(bm25.BM25Index, "build", classmethod(counting))
    exp = write_experiment(tmp_path / "rag.yaml", name="rag",
                           models=[f"hf:{tiny_llm}", {"id": f"hf:{tiny_llm}", "name": "twin"}], tasks=[kb],
                           settings=["rag:1", "rag:3"], generation={"max_new_tokens": 2})
    assert cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "a.db")[0] == 0
    assert len(built) == 1  # one index for two models and two K
    from labscale.engine import plan

    plan._INDEXES.clear()
    plan._HITS.clear()
    assert cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "b.db")[0] == 0
    assert len(built) == 1  # a second run reads the cached index
    info = json.loads(_rows(tmp_path / "b.db", "SELECT task_json FROM runs LIMIT 1")[0][0])["retrieval"]
    assert info["index_reused"] is True


def _bad(tmp_path, kb, tiny_llm, change):
    data = {"name": "bad", "models": [f"hf:{tiny_llm}"], "tasks": [kb], "settings": ["zero-shot", "rag:2"],
            "generation": {"max_new_tokens": 3}}
    data = change(tmp_path, data)
    return write_experiment(tmp_path / "bad.yaml", **data)


def _task(data, **kw):
    return {**data, "tasks": [{**data["tasks"][0], **kw}]}


BAD = {
    "a missing collection": (lambda t, d: _task(d, collection={"path": "nowhere"}),
                             "collection 'nowhere' does not exist"),
    "an empty collection": (lambda t, d: ((t / "empty").mkdir(), (t / "empty" / "a.md").write_text("  \n"),
                                          _task(d, collection={"path": "empty"}))[-1],
                            "is empty: its documents hold no text"),
    "a task without a collection": (lambda t, d: _task(d, collection=None, gold_passage=None),
                                    "setting 'rag:2' needs a document collection but task 'kbqa' has none"),
    "rag:0": (lambda t, d: {**d, "settings": ["rag:0"]}, "retrieval needs k >= 1 passages per query, got 0"),
    "an unknown retriever": (lambda t, d: {**d, "settings": ["rag:2:bm52"]}, "did you mean 'bm25'?"),
    "passages that do not fit the context": (
        lambda t, d: ((t / "long").mkdir(), [(t / "long" / f"{i}.md").write_text(("river nile water " * 50).strip())
                                             for i in range(4)], _task({**d, "settings": ["rag:3"]},
                                                                       collection={"path": "long"}))[-1],
        "with their 3 passages"),
    "a missing gold column": (lambda t, d: _task(d, gold_passage="golden"), "names column 'golden'"),
    "column options on a folder": (lambda t, d: _task(d, collection={"path": "docs", "text_column": "body"}),
                                   "text/id/title columns apply to table files only"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD))
def test_bad_rag_input_is_one_line_and_writes_nothing(case, tmp_path, kb, tiny_llm, capsys, monkeypatch):
    change, message = BAD[case]
    exp = _bad(tmp_path, kb, tiny_llm, change)
    db = tmp_path / "existing.db"
    good = write_experiment(tmp_path / "good.yaml", name="bad", models=[f"hf:{tiny_llm}"], tasks=["fact-check"],
                            limit=1, generation={"max_new_tokens": 2})
    assert cli(capsys, monkeypatch, "run", good, "--db", db)[0] == 0
    before = dump(db)
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
    assert code == 2, (out, err)
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert dump(db) == before


@pytest.mark.slow
def test_the_context_error_names_the_most_passages_that_fit(tmp_path, kb, tiny_llm, capsys, monkeypatch):
    (tmp_path / "mid").mkdir()
    for i in range(4):
        (tmp_path / "mid" / f"{i}.md").write_text(" ".join(["nile water river"] * 12))
    exp = _bad(tmp_path, kb, tiny_llm, lambda t, d: _task({**d, "settings": ["rag:4"]}, collection={"path": "mid"}))
    code, _, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "x.db")
    assert code == 2 and "passages are never cut or dropped" in err
    k = int(err.split("use rag:")[1].split(" ")[0])
    assert 1 <= k < 4, err
    ok = _bad(tmp_path, kb, tiny_llm, lambda t, d: _task({**d, "settings": [f"rag:{k}"]}, collection={"path": "mid"}))
    assert cli(capsys, monkeypatch, "run", ok, "--db", tmp_path / "y.db")[0] == 0


# -- the real embedded model and the packaged MiniLM -----------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.slow
def test_rag_qa_on_the_embedded_model(tmp_path, capsys, monkeypatch):
    from labscale.tasks.registry import get_task

    exp = write_experiment(tmp_path / "rq.yaml", name="rq", models=["embedded:smollm2-135m-instruct"],
                           tasks=["rag-qa"], settings=["zero-shot", "rag:2"], limit=4,
                           generation={"max_new_tokens": 4})
    db = tmp_path / "rq.db"
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
    assert code == 0, err
    gold = {e.id: e.meta["gold_passage"] for e in get_task("rag-qa", tmp_path).split("test", 4)}
    rows = _rows(db, "SELECT p.example_id, p.retrieved_json FROM predictions p JOIN runs r ON r.id = p.run_id "
                     "WHERE r.setting = 'rag:2'")
    hits = {i: [pid for pid, _ in json.loads(r)] for i, r in rows}
    direct = sum(any(p.split("#")[0] == gold[i] for p in ids) for i, ids in hits.items()) / len(hits)
    (value,) = _rows(db, "SELECT s.value FROM scores s JOIN runs r ON r.id = s.run_id "
                         "WHERE r.setting = 'rag:2' AND s.metric = 'recall_at_k'")[0]
    assert len(hits) == 4 and value == pytest.approx(direct)
    assert "### Closed-book vs rag:K" in (tmp_path / "rq.md").read_text()


@pytest.mark.real_model
@pytest.mark.slow
def test_dense_index_is_reused_on_a_second_run_without_re_embedding(tmp_path, kb, capsys, monkeypatch):
    from labscale.engine import plan
    from labscale.retrieval import dense

    encoded: list[int] = []
    real = dense.encode

    def counting(texts, batch_size=dense.BATCH_SIZE):
        encoded.append(len(texts))
        return real(texts, batch_size)

    monkeypatch.setattr(dense, "encode", counting)
    exp = write_experiment(tmp_path / "d.yaml", name="d", models=["embedded:smollm2-135m-instruct"], tasks=[kb],
                           settings=["zero-shot", "rag:1:dense"], generation={"max_new_tokens": 3})
    assert cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "a.db")[0] == 0
    assert encoded == [4, 6]  # every passage once, then the six questions
    plan._INDEXES.clear()
    plan._HITS.clear()
    code, out, _ = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "a.db")
    assert code == 0 and counts(out) == (0, 12)
    assert encoded == [4, 6, 6]  # the second run encodes only the questions: the index was read back
    scores = dict(_rows(tmp_path / "a.db", "SELECT s.metric, s.value FROM scores s JOIN runs r ON r.id = s.run_id "
                                           "WHERE r.setting = 'rag:1:dense'"))
    assert scores["recall_at_k"] >= 5 / 6  # MiniLM finds the right one of four short documents
