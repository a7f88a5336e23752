"""Turn raw model output into an answer: a label, a choice, or the generated text.

This docstring is the contract (the README summarises it); tests/test_answers.py holds a table of real answer
phrasings with the parse each must give.

cot
    The answer is what follows the last ``Answer:`` (case-insensitive), up to the end of that line; without one
    the output is unparseable for classify / multiple-choice tasks and used whole for generate tasks.

classify
    The label mentioned first wins, matched case-insensitively on word boundaries with spaces, hyphens and
    underscores treated alike (``not enough info`` → NOT_ENOUGH_INFO); at one position the longer label wins
    (``not supported`` → NOT SUPPORTED, not SUPPORTED). A task may list aliases per label (abstention-qa:
    ``cannot be answered`` → unanswerable). Numeric labels (``-1``, ``0``, ``1``, ``2.5``) match as whole
    numbers with their sign: ``1`` is not ``-1`` and ``10`` is neither; a unicode minus or en dash (``−1``)
    counts as ``-``, and ``+1`` as ``1``. No label → unparseable.

multiple choice, letter protocol (options ``A.`` … shown in the prompt; at most 26, see settings)
    Preparation: markdown and LaTeX wrappers are dropped (``**B**``, ``_B_``, ```B```, ``$B$``, ``\\boxed{B}``,
    headings). Where an option's text occurs in the answer (case-insensitive, whole words, longest first), letters
    inside it are part of the text, not letters (``Vitamin C``, ``Both A and B``), and an answer cue inside it is
    no cue (``Cannot answer`` as an option).

    A *letter* is a single letter standing alone (not in ``U.S.``, ``X-ray``, ``A-D``, ``I'm``) and within the
    options: ``E`` with four options is no choice.

    * Capital letters count, except that ``A`` and ``I`` followed by a word are the article and the pronoun
      (``A penguin``, ``I think``) unless the word cannot follow an article / the pronoun there (``A is``,
      ``A because``, ``A or``, ``I is``, …).
    * Lowercase letters count only in forms no word takes: in brackets ``(b)`` / ``[b]``; opening a line as
      ``b.``, ``b)``, ``b:`` or alone on it; after ``option`` / ``choice`` / ``letter``; and inside an answer
      clause (below) when no word follows the letter (``answer: b``, ``the answer is a.``). So
      ``The answer is a penguin`` names no letter; ``the answer is b because …`` is unparseable.
    * A letter is *negated* when ``not``, ``cannot``, ``never``, ``neither``, ``nor``, ``…n't``, ``except``,
      ``than``, ``instead of``, ``rule(d) out``, ``eliminate``, ``exclude``, ``without`` or ``against`` precedes it
      in its clause, give or take ``option``, ``the``, ``be`` or a bracket (``not A``, ``isn't option A``,
      ``can't be (A)``, ``B rather than A``) — the next letter of an ``or`` / ``and`` list shares the negation
      (``not A or B``) — or when a verdict follows it: ``is / are wrong``, ``incorrect``, ``false``, ``not correct``,
      ``not the answer``, ``ruled out``, ``can be eliminated`` (``A and B are wrong``; but ``the penguin is not
      able to fly`` negates nothing). Option texts are negated the same way (``not an eagle``).
    * A letter directly followed by an option's text (``B. penguin``, ``(B) penguin``) must agree with it: a
      letter followed by *another* option's text (``B. eagle`` where B is penguin) is a contradiction →
      unparseable (the longest option text that fits there decides).

    Decision, first rule that applies:

    1. *Answer cue.* The last of ``answer is`` / ``answer:`` / ``the answer would (should, might, …) be`` /
       ``correct (best, final) option is`` / ``I('d) choose (pick, select, go with)`` that is followed by some
       text. Its *clause* is the text after it up to the end of the sentence or line.
       One letter named (positively) in the clause → that option; two or more → unparseable (``the answer is B or
       C``); only an out-of-range letter → unparseable (``the answer is E``). Only negated letters (``the answer
       is not A``) → the one letter named positively elsewhere in the output and never negated, if exactly one
       (``not A; it is B``), else unparseable. No letter but option text: exactly one option's text (not negated)
       → that option (``The answer is a penguin.``), more → unparseable. The clause names nothing → rule 3
       applied to the text after the cue only (never to the reasoning before it); nothing there → unparseable
       (``Answer: none of the above`` when that is no option).
    2. *Opening letter.* The output opens with a letter alone or followed by ``.``, ``)``, ``:``, ``]`` or a dash
       (``B``, ``B.``, ``(B)``, ``B) penguin``, ``**B.** Penguins …``): that option, unless another letter joins it
       (``B and C``, ``B, C``, ``B or C`` → unparseable) or it is negated.
    3. *Scan.* The letters named positively and never negated: exactly one → that option (``I think it's B``,
       ``A is wrong, B is right``); two or more, or only negated ones → unparseable (``not A``). No letter at all:
       exactly one option's text, not negated (``an apple, surely``) → that option, else unparseable
       (``both stone and apple``, refusals such as ``I cannot answer`` or ``I don't know``).

    Digits are never read as option numbers. A refusal that is itself an option's text (BBQ's ``Cannot answer``)
    is that option. Rules follow OpenAI simple-evals (``Answer: X`` marks the answer) and lm-evaluation-harness
    (a leading letter, then ``(X)``, then the option text as fallbacks), stricter about case and articles.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from labscale.example import LETTERS, UNPARSEABLE, Example
from labscale.tasks.base import Task

# Bump when parsing changes: it is part of every run id, so stored parses are recomputed instead of reused.
ANSWER_PARSER_VERSION = 2

_ANSWER = re.compile(r"answer\s*:", re.IGNORECASE)


def final_answer(text: str) -> str | None:
    """Text after the last 'Answer:' marker, or None when there is none."""
    marks = list(_ANSWER.finditer(text))
    if not marks:
        return None
    return text[marks[-1].end() :].strip().splitlines()[0].strip() if text[marks[-1].end() :].strip() else ""


# ----------------------------------------------------------------------------------------------------- labels

_NUMBER = re.compile(r"[+\-−–]?\d+(?:\.\d+)?")


def _label_pattern(label: str) -> re.Pattern:
    label = label.strip()
    if _NUMBER.fullmatch(label):  # numeric labels: the whole number with its sign, never a piece of another
        digits = re.escape(label.lstrip("+-−–"))
        sign = r"[\-−–]" if label[0] in "-−–" else r"\+?"
        return re.compile(rf"(?<![\w.+\-−–]){sign}{digits}(?![\w]|[.,]\d)")
    words = [re.escape(w) for w in re.split(r"[\s_\-]+", label) if w]
    return re.compile(r"(?<![A-Za-z0-9])" + r"[\s_\-]+".join(words) + r"(?![A-Za-z0-9])", re.IGNORECASE)


def parse_label(text: str, labels: tuple[str, ...], aliases: dict[str, tuple[str, ...]] | None = None) -> str:
    """The label (or an alias of one, e.g. "cannot be answered" for UNANSWERABLE) mentioned first."""
    hits = []
    phrases = [(label, label) for label in labels]
    phrases += [(alias, label) for label, alias_list in (aliases or {}).items() for alias in alias_list]
    # Longer phrases first so that e.g. "NOT SUPPORTED" is not read as "SUPPORTED" at the same position.
    for phrase, label in sorted(phrases, key=lambda p: len(p[0]), reverse=True):
        m = _label_pattern(phrase).search(text)
        if m:
            hits.append((m.start(), -len(phrase), label))
    return min(hits)[2] if hits else UNPARSEABLE


# ---------------------------------------------------------------------------------------------------- choices

_I = re.IGNORECASE

# A standalone letter: not part of a word, an abbreviation (U.S., e.g.), a hyphenated word or range (X-ray, A-D),
# or a contraction (I'm, don't).
_LETTER = re.compile(r"(?<![\w.\-])(?<!\w['’])([A-Za-z])(?![\w\-]|['’]\w|\.\w)")
_CUE = re.compile(
    r"\b(?:answers?\b(?:\s+(?:to|for)\s+(?:this|the)\s+question|\s+here)?\s*"
    r"(?:isn['’]t|is\b|was\b|(?:would|should|will|must|might|could|may)\s+be\b|(?:seems|appears)\s+to\s+be\b|[:=])"
    r"|(?:correct|right|best|final)\s+(?:option|choice)\s*(?:is\b|would\s+be\b|:)"
    r"|\bI(?:['’]d|['’]ll|\s+would|\s+will)?\s+(?:choose|pick|select|go\s+with)\b)",
    _I,
)
# Words that follow "A" / "I" only when it is an option letter, never the article / the pronoun.
_AFTER_I = r"is|was|because|since|and|or|nor|seems|appears|looks|fits|matches"
_AFTER_A = _AFTER_I + r"|are|as|but|would|could|should|must|might|will|can"
_LETTER_WORD = {"A": re.compile(rf"\s+(?:{_AFTER_A})\b"), "I": re.compile(rf"\s+(?:{_AFTER_I})\b")}
_CLOSING = re.compile(r"\s*[\)\]]")
_WORD_NEXT = re.compile(r"\s+[A-Za-z]")
_LINE_OPENING = re.compile(r"[ \t]*(?:[-•>][ \t]*)?[(\[]?")
_AGREE_GAP = re.compile(r"[\)\]]?\s*(?:[.:)\]=\-–—]\s*)?")
_ARTICLE = re.compile(r"(?:the|an?)\s+", _I)
_CLOSES = re.compile(r"[\)\]]|[.:](?=\s|$)|\s*$|[ \t]*\n|\s+[-–—]\s")  # after a letter opening a line
_NO_WORD_AFTER = re.compile(r"[\)\]]?(?:\s*$|[ \t]*\n|[.,;:!?](?!\w))")
_CLAUSE_CUT = re.compile(r"[.;:!?,\n]|\bbut\b|\bso\b", _I)
_FILLERS = re.compile(r"(?:\s+|[(\[\"'‘“]|\b(?:option|choice|letter|the|an?|be)\b)*$", _I)
_NEGATOR = re.compile(
    r"(?:(?:\b|\bcan)not|\bnever|\bneither|\bnor|n['’]t|\bexcept|\bthan|\binstead\s+of|\brule[ds]?\s+out"
    r"|\beliminate[ds]?|\bexclude[ds]?|\bwithout|\bagainst)$",
    _I,
)
_NEGATED_AFTER = re.compile(
    r"[\)\]]?\s*(?:(?:,|\band\b|\bor\b|&|/)\s*(?:(?:option|choice)\s+)?[(\[]?[A-Za-z][\)\]]?\s*)*"
    r"(?:\b(?:is|are|was|were|seems?|looks?|appears?)\s+(?:(?:also|clearly|definitely|obviously|certainly)\s+)?"
    r"(?:wrong|incorrect|false|ruled\s+out|eliminated|excluded"
    r"|not\s+(?:the\s+)?(?:correct|right|best|true|valid|it|answer|one)\b)"
    r"|\b(?:is|are|was|were)n['’]t\b|\bcan\s+be\s+(?:ruled\s+out|eliminated|excluded))",
    _I,
)
_LIST_JOIN = re.compile(r"[\)\]]?\s*,?\s*(?:\bor\b|\band\b|\bnor\b|&|/|\+|,)\s*(?:(?:option|choice)\s+)?[(\[]?\s*$", _I)
_NEGATION_SHARED = re.compile(r"[\)\]]?\s*,?\s*(?:\bor\b|\band\b|&|/)\s*(?:(?:option|choice)\s+)?[(\[]?\s*$", _I)
_SENTENCE_END = re.compile(r"\n|[.!?](?=\s|$)")


@dataclass
class _Mention:
    index: int  # option index (may be >= the number of options: a letter that names no option)
    start: int
    end: int
    kind: str  # "strong" (brackets, option B, opening a line) | "upper" (a bare capital) | "lower" (answer clause only)
    negated: bool = False


def _clean(text: str) -> str:
    text = re.sub(r"\\(?:boxed|text|textbf|mathrm|mathbf)\{([^{}]*)\}", r"\1", text)
    text = re.sub(r"[*`$]+", "", text)
    text = re.sub(r"(?<![A-Za-z0-9])_+|_+(?![A-Za-z0-9])", "", text)
    text = re.sub(r"(?m)^[ \t]*#+[ \t]*", "", text)
    return text.strip()


def _option_pattern(choice: str) -> re.Pattern | None:
    words = _clean(choice).rstrip(".").split()
    if not words:
        return None
    return re.compile(r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)", _I)


def _negated(text: str, start: int, end: int) -> bool:
    before = text[max(0, start - 80) : start]
    cuts = list(_CLAUSE_CUT.finditer(before))
    if cuts:
        before = before[cuts[-1].end() :]
    fillers = _FILLERS.search(before)  # matches at the end at least (all parts optional)
    before = before[: fillers.start()] if fillers else before
    return bool(_NEGATOR.search(before)) or bool(_NEGATED_AFTER.match(text, end))


def _option_texts(text: str, patterns: list[re.Pattern | None]) -> list[_Mention]:
    """Non-overlapping occurrences of option texts, longest first."""
    found = [(m.start(), m.end(), i) for i, p in enumerate(patterns) if p for m in p.finditer(text)]
    kept: list[tuple[int, int, int]] = []  # sorted by start, never overlapping
    for s, e, i in sorted(found, key=lambda f: (f[0] - f[1], f[0])):
        at = bisect.bisect(kept, (s,))
        if (at == 0 or kept[at - 1][1] <= s) and (at == len(kept) or kept[at][0] >= e):
            kept.insert(at, (s, e, i))
    return [_Mention(i, s, e, "text", _negated(text, s, e)) for s, e, i in kept]


def _letters(text: str, texts: list[_Mention]) -> list[_Mention]:
    mentions: list[_Mention] = []
    spans = [(t.start, t.end) for t in texts if t.end - t.start > 1]
    for m in _LETTER.finditer(text):
        s, e, c = m.start(1), m.end(1), m.group(1)
        at = bisect.bisect(spans, (s, len(text) + 1)) - 1
        if at >= 0 and spans[at][0] <= s < spans[at][1]:
            continue  # part of an option's text: "Vitamin C", "Both A and B"
        before = text[max(0, s - 40) : s]
        strong = (
            (re.search(r"[(\[]\s*$", before) and _CLOSING.match(text, e))
            or re.search(r"\b(?:option|choice|letter)\s*[(\[]?\s*$", before, _I)
            or (_LINE_OPENING.fullmatch(text, text.rfind("\n", 0, s) + 1, s) and _CLOSES.match(text, e))
        )
        if strong:
            kind = "strong"
        elif c.isupper():
            if c in _LETTER_WORD and _WORD_NEXT.match(text, e) and not _LETTER_WORD[c].match(text, e):
                continue  # the article "A penguin", the pronoun "I think"
            kind = "upper"
        elif _NO_WORD_AFTER.match(text, e):
            kind = "lower"
        else:
            continue
        mentions.append(_Mention(LETTERS.index(c.upper()), s, e, kind, _negated(text, s, e)))
    for prev, cur in zip(mentions, mentions[1:]):  # "not A or B": B shares the negation
        if prev.negated and not cur.negated and _NEGATION_SHARED.match(text[prev.end : cur.start]):
            cur.negated = True
    return mentions


def _agrees(text: str, mention: _Mention, patterns: list[re.Pattern | None]) -> bool:
    """False when the letter is directly followed by the text of another option ("B. eagle", B being penguin)."""
    gap = _AGREE_GAP.match(text, mention.end)  # optional parts: matches (empty) anywhere
    starts = [gap.end() if gap else mention.end]
    article = _ARTICLE.match(text, starts[0])
    if article:
        starts.append(article.end())
    best = None
    for at in starts:
        for i, p in enumerate(patterns):
            hit = p.match(text, at) if p else None
            if hit and (best is None or hit.end() > best[0] or (hit.end() == best[0] and i == mention.index)):
                best = (hit.end(), i)
    return best is None or best[1] == mention.index


def _choose(index: int, mentions: list[_Mention], text: str, example: Example, patterns) -> str:
    if any(not _agrees(text, m, patterns) for m in mentions if m.index == index):
        return UNPARSEABLE
    return example.choices[index]


def _scan(text: str, letters: list[_Mention], texts: list[_Mention], n: int, example: Example, patterns) -> str:
    named = [m for m in letters if m.kind != "lower" and m.index < n]
    if named:
        picked = {m.index for m in named if not m.negated} - {m.index for m in named if m.negated}
        return _choose(picked.pop(), named, text, example, patterns) if len(picked) == 1 else UNPARSEABLE
    picked = {t.index for t in texts if not t.negated} - {t.index for t in texts if t.negated}
    return example.choices[picked.pop()] if len(picked) == 1 else UNPARSEABLE


def _clause(text, start, end, letters, texts, n, example, patterns) -> str | None:
    """The answer a cue's clause gives, UNPARSEABLE, or None when the clause names nothing."""
    inside = [m for m in letters if start <= m.start < end]
    positive = {m.index for m in inside if not m.negated}
    valid = {i for i in positive if i < n}
    if len(valid) == 1:
        return _choose(valid.pop(), inside, text, example, patterns)
    if valid or positive:
        return UNPARSEABLE  # two letters, or only a letter beyond the options
    if inside:  # "the answer is not A": the one other letter named positively, if exactly one
        named = [m for m in letters if m.index < n and (m.kind != "lower" or start <= m.start < end)]
        picked = {m.index for m in named if not m.negated} - {m.index for m in named if m.negated}
        return _choose(picked.pop(), named, text, example, patterns) if len(picked) == 1 else UNPARSEABLE
    in_texts = [t for t in texts if start <= t.start < end]
    picked = {t.index for t in in_texts if not t.negated} - {t.index for t in in_texts if t.negated}
    if len(picked) == 1:
        return example.choices[picked.pop()]
    return UNPARSEABLE if in_texts else None


def parse_choice(text: str, example: Example) -> str:
    """The option a generative answer names under the letter protocol, or UNPARSEABLE (rules: module docstring)."""
    n = min(len(example.choices), len(LETTERS))
    text = _clean(text)
    if not n or not text:
        return UNPARSEABLE
    patterns = [_option_pattern(c) for c in example.choices]
    texts = _option_texts(text, patterns)
    letters = _letters(text, texts)

    last_word = re.search(r"\w\W*\Z", text)
    cues = [c for c in _CUE.finditer(text)  # a cue followed by some text, and not inside an option's text
            if last_word and c.end() <= last_word.start() and not any(t.start <= c.start() < t.end for t in texts)]
    if cues:
        rest = text[cues[-1].end():]
        start = cues[-1].end() + len(rest) - len(rest.lstrip())
        stop = _SENTENCE_END.search(text, start)
        end = stop.end() if stop else len(text)
        decided = _clause(text, start, end, letters, texts, n, example, patterns)
        if decided is not None:
            return decided
        return _scan(text, [m for m in letters if m.start >= start], [t for t in texts if t.start >= start], n,
                     example, patterns)

    first = letters[0] if letters else None
    if first and first.kind == "strong" and first.index < n and not first.negated and \
            re.fullmatch(r"[(\[]?", text[: first.start]):
        after = letters[1] if len(letters) > 1 else None
        if after and after.index < n and _LIST_JOIN.match(text[first.end : after.start]):
            return UNPARSEABLE  # "B and C", "B, C", "B or C"
        return _choose(first.index, [first], text, example, patterns)
    return _scan(text, letters, texts, n, example, patterns)


def parse_answer(task: Task, example: Example, output: str, cot: bool) -> str:
    text = output.strip()
    if cot:
        answer = final_answer(text)
        if answer is None:
            return text if task.type == "generate" else UNPARSEABLE
        text = answer
    if task.type == "classify":
        return parse_label(text, task.labels, task.label_aliases)
    if task.type == "multiple_choice":
        return parse_choice(text, example)
    return text
