import pytest

from labscale.answers import ANSWER_PARSER_VERSION, final_answer, parse_answer, parse_choice, parse_label
from labscale.errors import ConfigError
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


# ------------------------------------------------------------------ real-world answer phrasings (letter protocol)

BIRD = Example("b", "Which bird cannot fly?", "penguin", ("eagle", "penguin", "sparrow", "owl"), 1)
VITAMIN = Example("v", "Which vitamin prevents scurvy?", "Vitamin C",
                  ("Vitamin A", "Vitamin C", "Vitamin D", "Iron"), 1)
BBQ = Example("q", "Who was forgetful?", "Cannot answer", ("The grandfather", "The grandson", "Cannot answer"), 2)
NOTA = Example("n", "Which is a primary colour?", "red", ("red", "green", "None of the above"), 0)
BOTH = Example("2", "Which are mammals?", "Both A and B", ("cats", "dogs", "Both A and B", "Neither"), 2)
TEN = Example("t", "Which number?", "nine", tuple("one two three four five six seven eight nine ten".split()), 8)

PHRASINGS = [
    # plain letters and their punctuation
    ("letter", BIRD, "B", "penguin"),
    ("letter", BIRD, "B.", "penguin"),
    ("letter", BIRD, "(B)", "penguin"),
    ("letter", BIRD, "[B]", "penguin"),
    ("letter", BIRD, "B) penguin", "penguin"),
    ("letter", BIRD, "B - penguin", "penguin"),
    ("letter", BIRD, "A", "eagle"),
    ("letter", BIRD, "A.", "eagle"),
    ("letter", BIRD, "A because eagles are strong fliers", "eagle"),
    ("letter", BIRD, "I think it's B.", "penguin"),
    ("letter", BIRD, "B is the correct answer.", "penguin"),
    ("letter", BIRD, "A is the correct answer.", "eagle"),
    ("letter", BIRD, "The answer is 'B'.", "penguin"),
    # articles are not letters: the issue-10 bug
    ("article", BIRD, "The answer is a penguin.", "penguin"),
    ("article", BIRD, "The answer is a sparrow.", "sparrow"),
    ("article", BIRD, "The answer is a kiwi.", UNPARSEABLE),
    ("article", BIRD, "A penguin.", "penguin"),
    ("article", BIRD, "Answer: A penguin", "penguin"),
    ("article", BIRD, "An owl can fly, but a penguin cannot.", UNPARSEABLE),  # two options named, no letter
    ("article", TEN, "I think nine.", "nine"),  # the pronoun, even where I is an option
    ("article", TEN, "I", "nine"),
    ("article", TEN, "I is correct", "nine"),
    # lowercase letters: only in forms no word takes
    ("lowercase", BIRD, "b", "penguin"),
    ("lowercase", BIRD, "(b)", "penguin"),
    ("lowercase", BIRD, "c. sparrow", "sparrow"),
    ("lowercase", BIRD, "Answer: b", "penguin"),
    ("lowercase", BIRD, "answer: a", "eagle"),
    ("lowercase", BIRD, "the answer is a.", "eagle"),
    ("lowercase", BIRD, "the answer is b because it cannot fly", UNPARSEABLE),
    ("lowercase", BIRD, "i think b", UNPARSEABLE),
    # option / choice words
    ("option", BIRD, "Option B", "penguin"),
    ("option", BIRD, "option b", "penguin"),
    ("option", BIRD, "I'd go with option (B).", "penguin"),
    ("option", BIRD, "The correct option is B.", "penguin"),
    ("option", BIRD, "Options B and C are both plausible.", UNPARSEABLE),
    # two letters: ambiguous
    ("ambiguous", BIRD, "B and C", UNPARSEABLE),
    ("ambiguous", BIRD, "A or B", UNPARSEABLE),
    ("ambiguous", BIRD, "B, C", UNPARSEABLE),
    ("ambiguous", BIRD, "(B) or (C)", UNPARSEABLE),
    ("ambiguous", BIRD, "The answer is B or C.", UNPARSEABLE),
    ("ambiguous", BIRD, "Answer: either A or B", UNPARSEABLE),
    ("ambiguous", BIRD, "I can't choose between A and B.", UNPARSEABLE),
    # negation
    ("negation", BIRD, "not A", UNPARSEABLE),
    ("negation", BIRD, "The answer is not A.", UNPARSEABLE),
    ("negation", BIRD, "Not A; it is B.", "penguin"),
    ("negation", BIRD, "Eagles fly (A), penguins swim (B). The answer is not A.", "penguin"),
    ("negation", BIRD, "It cannot be A. B fits.", "penguin"),
    ("negation", BIRD, "A is wrong, B is right.", "penguin"),
    ("negation", BIRD, "It's definitely B, not A.", "penguin"),
    ("negation", BIRD, "The answer is B rather than A.", "penguin"),
    ("negation", BIRD, "It isn't A or C; B is correct.", "penguin"),
    ("negation", BIRD, "It can't be (A), so C.", "sparrow"),
    ("negation", BIRD, "Neither A nor B.", UNPARSEABLE),
    ("negation", BIRD, "A and C are wrong.", UNPARSEABLE),  # B or D remain
    ("negation", BIRD, "Not an eagle but a penguin.", "penguin"),
    ("negation", BIRD, "B is not the answer; D is.", "owl"),
    ("negation", BIRD, "The penguin is not able to fly.", "penguin"),  # a statement, not a verdict on the option
    # bold / markdown / LaTeX
    ("markdown", BIRD, "**B**", "penguin"),
    ("markdown", BIRD, "**B.** Penguins cannot fly.", "penguin"),
    ("markdown", BIRD, "`B`", "penguin"),
    ("markdown", BIRD, "_B_", "penguin"),
    ("markdown", BIRD, "**Answer:** **B**", "penguin"),
    ("markdown", BIRD, "### Answer\nB", "penguin"),
    ("markdown", BIRD, "Final answer: $\\boxed{B}$", "penguin"),
    ("markdown", BIRD, "- B", "penguin"),
    # the option text, with and without its letter
    ("text", BIRD, "penguin", "penguin"),
    ("text", BIRD, "The penguin.", "penguin"),
    ("text", BIRD, "B. penguin", "penguin"),
    ("text", BIRD, "The correct answer is (B) penguin.", "penguin"),
    ("text", BIRD, "B. eagle", UNPARSEABLE),  # the letter and the text disagree
    ("text", BIRD, "(C) owl", UNPARSEABLE),
    ("text", VITAMIN, "Vitamin C", "Vitamin C"),  # the C is part of option B's text
    ("text", VITAMIN, "The answer is Vitamin C.", "Vitamin C"),
    ("text", VITAMIN, "B. Vitamin C", "Vitamin C"),
    ("text", VITAMIN, "C. Vitamin C", UNPARSEABLE),
    ("text", VITAMIN, "C", "Vitamin D"),
    ("text", BOTH, "C. Both A and B", "Both A and B"),
    ("text", BOTH, "The answer is both A and B.", "Both A and B"),
    ("text", BBQ, "B. The grandfather", UNPARSEABLE),
    ("text", BBQ, "The grandson.", "The grandson"),
    # refusals and "none of the above"
    ("refusal", BIRD, "I cannot answer this question.", UNPARSEABLE),
    ("refusal", BIRD, "I don't know.", UNPARSEABLE),
    ("refusal", BIRD, "As an AI, I cannot determine this.", UNPARSEABLE),
    ("refusal", BIRD, "I'm sorry, but I can't help with that.", UNPARSEABLE),
    ("refusal", BIRD, "None of the above.", UNPARSEABLE),
    ("refusal", BIRD, "Eagles fly (A)... Answer: none of the above", UNPARSEABLE),  # the reasoning is not the answer
    ("refusal", NOTA, "None of the above", "None of the above"),  # here it is an option
    ("refusal", NOTA, "C", "None of the above"),
    ("refusal", BBQ, "I cannot answer that.", "Cannot answer"),  # BBQ's unknown option, in so many words
    # "Answer: B" after reasoning, and self-corrections
    ("reasoning", BIRD, "Eagles and sparrows fly; owls too.\nAnswer: B", "penguin"),
    ("reasoning", BIRD, "Let me check.\nA) eagle: flies\nB) penguin: cannot fly\nSo the answer is B.", "penguin"),
    ("reasoning", BIRD, "Answer: B\nA is wrong because eagles fly.", "penguin"),
    ("reasoning", BIRD, "Penguins cannot fly. The answer is B.\n\nThe others (A, C, D) all fly.", "penguin"),
    ("reasoning", BIRD, "A. Wait, no: the answer is B.", "penguin"),  # the last answer cue wins
    ("reasoning", BIRD, "B\n\nExplanation: unlike the eagle (A), penguins cannot fly.", "penguin"),  # opening letter
    ("reasoning", BIRD, "I think the answer might be B, but I'm not sure.", "penguin"),
    ("reasoning", BIRD, "The answer is:\n\nB", "penguin"),
    ("reasoning", BIRD, "The answer is unclear. I'd guess B.", "penguin"),
    ("reasoning", BIRD, "Penguins swim, eagles soar. So it is a penguin.", "penguin"),  # plurals are other words
    ("reasoning", BIRD, "An eagle soars and a penguin swims.", UNPARSEABLE),  # two option texts, no letter
    # letters beyond the options
    ("range", BIRD, "E", UNPARSEABLE),
    ("range", BIRD, "The answer is E.", UNPARSEABLE),
    ("range", BIRD, "Answer: E. None of these", UNPARSEABLE),
    ("range", VITAMIN, "Vitamin E", UNPARSEABLE),
    ("range", TEN, "J", "ten"),
    ("range", TEN, "K", UNPARSEABLE),
    # things that only look like letters
    ("lookalike", BIRD, "U.S. birds: B", "penguin"),
    ("lookalike", BIRD, "X-rays show hollow bones, so B", "penguin"),
    ("lookalike", BIRD, "2", UNPARSEABLE),  # digits are not option numbers
]


@pytest.mark.parametrize("category, example, text, expected", PHRASINGS,
                         ids=[f"{c}:{t[:40]}" for c, _, t, _ in PHRASINGS])
def test_real_world_phrasings(category, example, text, expected):
    assert parse_choice(text, example) == expected


def test_the_table_covers_every_category():
    categories = {c for c, *_ in PHRASINGS}
    assert len(PHRASINGS) >= 40
    assert categories >= {"letter", "article", "lowercase", "option", "ambiguous", "negation", "markdown", "text",
                          "refusal", "reasoning", "range"}


def test_cot_answer_line_goes_through_the_same_rules():
    mc = _task("multiple_choice")
    assert parse_answer(mc, BIRD, "Eagles fly.\nAnswer: a penguin", cot=True) == "penguin"
    assert parse_answer(mc, BIRD, "Eagles fly.\nAnswer: **B**", cot=True) == "penguin"
    assert parse_answer(mc, BIRD, "Penguins cannot fly, so B.", cot=True) == UNPARSEABLE  # no answer line


@pytest.mark.parametrize(
    "text, label",
    [("1", "1"), ("-1", "-1"), ("−1", "-1"), ("0", "0"), ("+1", "1"), ("The label is 1.", "1"),
     ("Label: -1 (negative)", "-1"), ("10", UNPARSEABLE), ("1.5", UNPARSEABLE), ("-10", UNPARSEABLE)],
)
def test_signed_numeric_labels_match_exactly(text, label):
    assert parse_label(text, ("-1", "0", "1")) == label


def test_parser_version_is_part_of_the_run_id(monkeypatch):
    """A parser change gives new run ids, so stored parses are recomputed (generations still come from the cache)."""
    from types import SimpleNamespace

    from labscale.engine import plan

    gen = SimpleNamespace(max_new_tokens=8, cot_max_new_tokens=64, temperature=0.0, top_p=1.0, stop=[])
    exp = SimpleNamespace(generation=gen, seed=0, bootstrap_samples=100)
    info = SimpleNamespace(fingerprint="f", context_length=4096, name="stub", supports_loglikelihood=False)
    backend = SimpleNamespace(info=info, supports_loglikelihood=False, count_tokens=len,
                              render=lambda messages: messages[-1]["content"])
    task = _task("multiple_choice")
    setting = plan.parse_setting("zero-shot")

    def run_id():
        return plan.plan_run(exp, SimpleNamespace(label="stub"), backend, task, setting, [BIRD]).id

    assert ANSWER_PARSER_VERSION >= 2
    before = run_id()
    assert run_id() == before
    monkeypatch.setattr(plan, "ANSWER_PARSER_VERSION", ANSWER_PARSER_VERSION + 1)
    assert run_id() != before


def test_more_than_26_choices_under_the_letter_protocol_is_a_config_error():
    from labscale.settings.setting import chat_prompt, parse_setting

    many = Example("m1", "Pick one.", "c0", tuple(f"c{i}" for i in range(30)), 0)
    task = Task("wide", "", "multiple_choice", "", ["acc"], "acc", "", "", lambda: [many])
    with pytest.raises(ConfigError) as e:
        chat_prompt(task, parse_setting("cot"), many, 0)
    message = str(e.value)
    assert "\n" not in message and "'wide'" in message and "30 choices" in message and "log-likelihood" in message
    ok = Example("m2", "Pick one.", "c0", tuple(f"c{i}" for i in range(26)), 0)
    assert "Z. c25" in chat_prompt(task, parse_setting("cot"), ok, 0)[-1]["content"]


def test_a_wide_task_on_an_api_model_fails_in_planning_before_the_database_opens(tmp_path, capsys, monkeypatch):
    import json

    from fault_server import FaultServer
    from helpers import cli, write_experiment

    choices = [f"colour {i}" for i in range(30)]
    data = tmp_path / "wide.jsonl"
    data.write_text("".join(json.dumps({"q": f"Pick {i}", "options": choices, "gold": i}) + "\n" for i in range(3)))
    task = {"name": "wide", "data": str(data), "type": "multiple_choice", "input": "{{ q }}", "choices": "options",
            "target": "gold", "metrics": ["acc"], "split_fractions": [0.0, 0.0, 1.0]}
    monkeypatch.setenv("LABSCALE_TEST_API_KEY", "sk-test")
    with FaultServer(key="sk-test") as server:
        model = {"id": "openai:fake-gpt", "base_url": server.url, "api_key_env": "LABSCALE_TEST_API_KEY"}
        exp = write_experiment(tmp_path / "wide.yaml", name="wide", models=[model], tasks=[task])
        code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "wide.db")
        assert server.total == 0
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "task 'wide' has 30 choices" in lines[0], err
    assert "log-likelihood" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "wide.db").exists()
