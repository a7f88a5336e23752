import pytest

from labscale.answers import final_answer, parse_answer, parse_choice, parse_label
from labscale.example import UNPARSEABLE, Example
from labscale.tasks.base import Task

LABELS = ("SUPPORTS", "REFUTES", "NOT_ENOUGH_INFO")


@pytest.mark.parametrize(
    "text, label",
    [
        ("SUPPORTS", "SUPPORTS"),
        ("The evidence refutes the claim.", "REFUTES"),
        ("not enough info", "NOT_ENOUGH_INFO"),
        ("NOT-ENOUGH-INFO", "NOT_ENOUGH_INFO"),
        ("It SUPPORTS it, it does not REFUTE", "SUPPORTS"),  # first mention wins
        ("REFUTESX", UNPARSEABLE),  # word boundaries
        ("I cannot tell", UNPARSEABLE),
    ],
)
def test_parse_label(text, label):
    assert parse_label(text, LABELS) == label


def test_longer_label_wins_at_same_position():
    assert parse_label("not supported", ("SUPPORTED", "NOT SUPPORTED")) == "NOT SUPPORTED"


EX = Example("1", "Which is a fruit?", "apple", ("stone", "apple", "chair", "cloud"), 1)


@pytest.mark.parametrize(
    "text, choice",
    [
        ("B", "apple"),
        ("(C)", "chair"),
        ("D. cloud", "cloud"),
        ("The answer is B because", "apple"),
        ("I would say (A) here", "stone"),
        ("an apple, surely", "apple"),
        ("A lot of things", UNPARSEABLE),
        ("both stone and apple", UNPARSEABLE),
        ("", UNPARSEABLE),
    ],
)
def test_parse_choice(text, choice):
    assert parse_choice(text, EX) == choice


def test_final_answer_takes_the_last_marker():
    assert final_answer("Answer: maybe\nthinking more\nAnswer: REFUTES\n") == "REFUTES"
    assert final_answer("no marker") is None


def _task(kind, labels=()):
    return Task("t", "", kind, "", ["accuracy"], "accuracy", "", "", lambda: [], labels=labels)


def test_cot_without_answer_line_is_unparseable_for_labels_but_kept_for_text():
    assert parse_answer(_task("classify", LABELS), EX, "It SUPPORTS the claim", cot=True) == UNPARSEABLE
    assert parse_answer(_task("classify", LABELS), EX, "reasons…\nAnswer: refutes", cot=True) == "REFUTES"
    assert parse_answer(_task("generate"), EX, " a summary \n", cot=True) == "a summary"


def test_label_aliases_count_as_their_label_and_the_first_mention_wins():
    labels, aliases = ("yes", "no", "unanswerable"), {"unanswerable": ("cannot be answered", "no information")}
    assert parse_label("This cannot be answered from the context.", labels, aliases) == "unanswerable"
    assert parse_label("There is no information on that.", labels, aliases) == "unanswerable"  # longest at a spot
    assert parse_label("No, it cannot be answered.", labels, aliases) == "no"  # first mention
    assert parse_label("Cannot be answered.", labels) == "<unparseable>"  # without aliases
