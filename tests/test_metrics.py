"""forgeline/metrics.py against reference values: other libraries' own output (torchmetrics, sacrebleu,
scikit-learn) and published worked examples (sacrebleu's README, rouge-score's README, nltk's METEOR
doctests, Wikipedia's DCG example, closed forms). Never against numbers forgeline produced."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import forgeline.metrics
from forgeline import metrics

ROOT = Path(__file__).resolve().parents[1]
tm = pytest.importorskip("torchmetrics")


def test_metrics_module_is_this_repo():
    assert Path(forgeline.metrics.__file__).resolve().is_relative_to(ROOT)


# ----------------------------------------------------------------------------- language modelling


def test_perplexity_matches_torchmetrics():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, 17, generator=gen)
    targets = torch.randint(0, 17, (3, 10), generator=gen)
    targets[0, :4] = -100
    ref = tm.text.Perplexity(ignore_index=-100)(logits, targets).item()
    assert metrics.perplexity(logits, targets) == pytest.approx(ref, rel=1e-5)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
    assert metrics.perplexity_from_nll(nll, int((targets != -100).sum())) == pytest.approx(ref, rel=1e-5)


def test_bits_per_byte_worked_example():
    # 8 bits of surprise spread over 4 bytes is 2 bits per byte; a uniform 256-way guess is 8
    assert metrics.bits_per_byte(8 * math.log(2), 4) == pytest.approx(2.0)
    assert metrics.bits_per_byte(100 * math.log(256), 100) == pytest.approx(8.0)


# ----------------------------------------------------------------------------- generation


def test_exact_match_at_1_matches_torchmetrics_squad():
    preds = ["The Eiffel Tower", "1889", "paris, france", "a cat"]
    refs = [["Eiffel Tower"], ["in 1889", "1889"], ["Paris"], ["the cat", "cat"]]
    ref = tm.functional.text.squad(
        [{"prediction_text": p, "id": str(i)} for i, p in enumerate(preds)],
        [{"answers": {"answer_start": [0] * len(r), "text": r}, "id": str(i)} for i, r in enumerate(refs)])
    assert metrics.exact_match_at_n([[p] for p in preds], refs, n=1) == pytest.approx(ref["exact_match"].item() / 100)


def test_exact_match_at_n_counts_any_of_the_first_n():
    cands = [["Rome", "Paris", "Lyon"], ["4", "5", "four"], ["x", "y", "z"]]
    refs = ["paris", ["four"], "w"]
    assert [metrics.exact_match_at_n(cands, refs, n) for n in (1, 2, 3)] == pytest.approx([0, 1 / 3, 2 / 3])


def test_bleu_sacrebleu_readme_example():
    # sacrebleu README: BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = 0.943 ratio = 0.944 hyp_len = 17 ref_len = 18)
    streams = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
               ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    per_hyp = [list(r) for r in zip(*streams)]
    assert metrics.bleu(hyps, per_hyp) == pytest.approx(48.53, abs=0.005)


def test_bleu_matches_torchmetrics_sacrebleu():
    hyps = ["the cat sat on the mat today", "a quick brown fox jumped over the dog", "hello there general kenobi"]
    refs = [["the cat is on the mat today", "there is a cat on the mat"],
            ["the quick brown fox jumps over the lazy dog"],
            ["hello there", "general kenobi, hello there"]]
    ref = tm.text.SacreBLEUScore(tokenize="13a")(hyps, refs).item() * 100
    assert metrics.bleu(hyps, refs) == pytest.approx(ref, abs=1e-3)


def test_rouge_readme_example():
    # rouge-score README: rouge1 P 0.75 R 0.6667 F 0.7059; rougeL P 0.625 R 0.5556 F 0.5882
    got = metrics.rouge(["The quick brown dog jumps on the log."], [["The quick brown fox jumps over the lazy dog"]],
                        types=("rouge1", "rougeL"))
    assert got["rouge1_precision"] == pytest.approx(0.75)
    assert got["rouge1_recall"] == pytest.approx(2 / 3)
    assert got["rouge1"] == pytest.approx(0.7058823529411765)
    assert got["rougeL"] == pytest.approx(0.5882352941176471)


def test_rouge_matches_torchmetrics():
    hyps = ["the cat sat on the mat", "my name is john and I live in a house", "police killed the gunman"]
    refs = [["a cat was sitting on the mat"], ["john is my name", "my name is john"], ["the gunman was shot dead by police"]]
    ref = tm.text.ROUGEScore(rouge_keys=("rouge1", "rouge2", "rougeL"), accumulate="best")(hyps, refs)
    got = metrics.rouge(hyps, refs)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert got[key] == pytest.approx(ref[f"{key}_fmeasure"].item(), abs=1e-5)


needs_wordnet = pytest.mark.skipif(not Path(metrics.WORDNET_DIR, "data.noun").exists(),
                                   reason="WordNet database missing: apt-get install wordnet-base")


@needs_wordnet
def test_wordnet_reader_matches_the_nltk_howto():
    # NLTK's WordNet HOWTO: wn.synsets('dog')
    names = [s.name() for s in metrics.wordnet().synsets("dog")]
    assert names == ["dog.n.01", "frump.n.01", "dog.n.03", "cad.n.01", "frank.n.02", "pawl.n.01",
                     "andiron.n.01", "chase.v.01"]


@needs_wordnet
def test_meteor_nltk_doctest_examples():
    # nltk.translate.meteor_score docstring: 0.6944 for one and for three references; 0.0 when nothing matches
    hyp1 = ("It is a guide to action which ensures that the military always obeys the commands of the party")
    ref1 = "It is a guide to action that ensures that the military will forever heed Party commands"
    ref2 = ("It is the guiding principle which guarantees the military forces always being under the command "
            "of the Party")
    ref3 = "It is the practical guide for the army always to heed the directions of the party"
    assert round(metrics.meteor([hyp1], [[ref1]]), 4) == 0.6944
    assert round(metrics.meteor([hyp1], [[ref1, ref2, ref3]]), 4) == 0.6944
    assert metrics.meteor(["non matching hypothesis"], [["this is a cat"]]) == 0.0


@needs_wordnet
def test_meteor_matches_wordnet_synonyms():
    # every unigram matched (car ~ auto: both lemmas of WordNet's car.n.01), one chunk of m = 4:
    # Fmean = 1, penalty = 0.5 * (1/4)^3, METEOR = 1 - 0.5/64 (Banerjee & Lavie 2005 formula).
    # (nltk's synonym stage looks up Porter stems, so the hypothesis word must be its own stem)
    assert metrics.meteor(["the car is red"], [["the auto is red"]]) == pytest.approx(1 - 0.5 / 64)
    # without the synonym: m = 3 in 2 chunks, P = R = 3/4: 0.75 * (1 - 0.5 * (2/3)^3)
    assert metrics.meteor(["the bus is red"], [["the auto is red"]]) == pytest.approx(0.75 * (1 - 0.5 * (2 / 3) ** 3))


def test_cider_worked_examples():
    # two images, one reference each, no n-gram shared across images: idf = log 2 for every n-gram,
    # an exact 2-word caption has cosine 1 for n = 1, 2 and no 3-, 4-grams: 10 * (1 + 1 + 0 + 0) / 4 = 5
    assert metrics.cider(["cat sat", "dog ran"], [["cat sat"], ["dog ran"]]) == pytest.approx(5.0)
    assert metrics.cider(["bird flew", "fish swam"], [["cat sat"], ["dog ran"]]) == 0.0


# ----------------------------------------------------------------------------- classification, regression


@pytest.fixture(scope="module")
def labels():
    gen = np.random.default_rng(0)
    y_true = gen.integers(0, 4, 200)
    y_pred = np.where(gen.random(200) < 0.6, y_true, gen.integers(0, 4, 200))
    y_pred[y_pred == 3] = 2  # class 3 never predicted: precision's 0/0 case
    return y_true, y_pred


def test_confusion_matrix_matches_torchmetrics(labels):
    y_true, y_pred = labels
    ref = tm.functional.classification.multiclass_confusion_matrix(torch.tensor(y_pred), torch.tensor(y_true), 4)
    np.testing.assert_array_equal(metrics.confusion_matrix(y_true, y_pred, 4), ref.numpy())


@pytest.mark.parametrize("average", ["macro", "micro", "weighted"])
def test_classification_matches_torchmetrics_and_sklearn(labels, average):
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    F = tm.functional.classification
    y_true, y_pred = labels
    p, t = torch.tensor(y_pred), torch.tensor(y_true)
    got = metrics.classification(y_true, y_pred, 4, average)
    assert got["accuracy"] == pytest.approx(F.multiclass_accuracy(p, t, 4, average="micro").item())
    assert got["precision"] == pytest.approx(F.multiclass_precision(p, t, 4, average=average).item(), abs=1e-6)
    assert got["recall"] == pytest.approx(F.multiclass_recall(p, t, 4, average=average).item(), abs=1e-6)
    assert got["f1"] == pytest.approx(F.multiclass_f1_score(p, t, 4, average=average).item(), abs=1e-6)
    sk = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
    assert (got["precision"], got["recall"], got["f1"]) == pytest.approx(sk[:3])
    assert got["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))


def test_regression_matches_torchmetrics():
    gen = torch.Generator().manual_seed(1)
    y, yhat = torch.randn(50, generator=gen), torch.randn(50, generator=gen)
    got = metrics.regression(y.tolist(), yhat.tolist())
    assert got["mse"] == pytest.approx(tm.functional.mean_squared_error(yhat, y).item(), rel=1e-6)
    assert got["mae"] == pytest.approx(tm.functional.mean_absolute_error(yhat, y).item(), rel=1e-6)
    assert got["rmse"] == pytest.approx(tm.functional.mean_squared_error(yhat, y, squared=False).item(), rel=1e-6)


# ----------------------------------------------------------------------------- retrieval


@pytest.fixture(scope="module")
def rankings():
    """6 queries x 10 candidates: scores, graded relevance 0..3 (each query has a relevant one)."""
    gen = torch.Generator().manual_seed(2)
    scores = torch.rand(6, 10, generator=gen)
    grades = torch.randint(0, 4, (6, 10), generator=gen) * (torch.rand(6, 10, generator=gen) < 0.4)
    grades[:, 0] = grades[:, 0].clamp(min=1)
    ranked = [scores[q].argsort(descending=True).tolist() for q in range(6)]
    relevant = [set(grades[q].nonzero().flatten().tolist()) for q in range(6)]
    relevance = [{d: float(grades[q, d]) for d in range(10) if grades[q, d] > 0} for q in range(6)]
    indexes = torch.arange(6)[:, None].expand(6, 10).flatten()
    return ranked, relevant, relevance, (scores.flatten(), grades.flatten(), indexes)


@pytest.mark.parametrize("k", [1, 3, 5, 10])
def test_retrieval_at_k_matches_torchmetrics(rankings, k):
    R = tm.retrieval
    ranked, relevant, relevance, (preds, grades, indexes) = rankings
    binary = grades > 0
    assert metrics.precision_at_k(ranked, relevant, k) == pytest.approx(R.RetrievalPrecision(top_k=k)(preds, binary, indexes).item())
    assert metrics.recall_at_k(ranked, relevant, k) == pytest.approx(R.RetrievalRecall(top_k=k)(preds, binary, indexes).item())
    assert metrics.hit_rate_at_k(ranked, relevant, k) == pytest.approx(R.RetrievalHitRate(top_k=k)(preds, binary, indexes).item())
    assert metrics.ndcg_at_k(ranked, relevance, k) == pytest.approx(R.RetrievalNormalizedDCG(top_k=k)(preds, grades, indexes).item(), abs=1e-6)
    assert metrics.mrr(ranked, relevant, k) == pytest.approx(R.RetrievalMRR(top_k=k)(preds, binary, indexes).item())



def test_map_matches_torchmetrics_and_sklearn_on_full_rankings(rankings):
    from sklearn.metrics import average_precision_score

    ranked, relevant, _, (preds, grades, indexes) = rankings
    binary = grades > 0
    got = metrics.mean_average_precision(ranked, relevant)
    assert got == pytest.approx(tm.retrieval.RetrievalMAP()(preds, binary, indexes).item())
    sk = np.mean([average_precision_score(binary.view(6, 10)[q].numpy(), preds.view(6, 10)[q].numpy())
                  for q in range(6)])
    assert got == pytest.approx(sk)


def test_average_precision_at_k_worked_example():
    # TREC AP: relevant items at ranks 1, 3, 6, and one never retrieved (|relevant| = 4):
    # AP = (1/1 + 2/3 + 3/6) / 4; cut at k = 3 the rank-6 hit drops out: (1/1 + 2/3) / 4
    ranked = [["a", "x", "b", "y", "z", "c"]]
    relevant = [{"a", "b", "c", "d"}]
    assert metrics.mean_average_precision(ranked, relevant) == pytest.approx((1 + 2 / 3 + 3 / 6) / 4)
    assert metrics.mean_average_precision(ranked, relevant, k=3) == pytest.approx((1 + 2 / 3) / 4)


def test_ndcg_matches_sklearn(rankings):
    from sklearn.metrics import ndcg_score

    ranked, _, relevance, (preds, grades, _) = rankings
    ref = ndcg_score(grades.view(6, 10).numpy(), preds.view(6, 10).numpy(), k=5)
    assert metrics.ndcg_at_k(ranked, relevance, 5) == pytest.approx(ref)


def test_dcg_wikipedia_example():
    # en.wikipedia.org/wiki/Discounted_cumulative_gain: relevances 3, 2, 3, 0, 1, 2 -> DCG_6 = 6.861
    assert metrics.dcg([3, 2, 3, 0, 1, 2]) == pytest.approx(6.861, abs=5e-4)


# ----------------------------------------------------------------------------- image generation


def test_frechet_distance_closed_forms():
    d = 5
    mu = np.arange(d, dtype=float)
    assert metrics.frechet_distance(np.zeros(d), np.eye(d), mu, np.eye(d)) == pytest.approx((mu ** 2).sum())
    # N(0, a^2 I) vs N(0, b^2 I): d (a - b)^2
    assert metrics.frechet_distance(np.zeros(d), 4 * np.eye(d), np.zeros(d), 9 * np.eye(d)) == pytest.approx(d * 1.0)


def test_inception_score_closed_forms():
    # confident and uniform over C classes: IS = C; all images the same class: IS = 1
    c = 7
    confident = torch.full((c * 3, c), -1e4)
    confident[torch.arange(c * 3), torch.arange(c * 3) % c] = 0
    assert metrics.inception_score(confident)[0] == pytest.approx(c, rel=1e-6)
    assert metrics.inception_score(torch.zeros(10, c))[0] == pytest.approx(1.0)


class _Extractor(torch.nn.Module):
    """A stand-in for our trained classifier: a fixed random projection of 8x8 images."""

    num_features = 6

    def __init__(self, out: int):
        super().__init__()
        self.proj = torch.nn.Linear(64, out)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(3))

    def forward(self, x):
        return self.proj(x.float().flatten(1))


@pytest.mark.filterwarnings("ignore::UserWarning")  # torchmetrics: features kept in memory; std of 1 split
def test_fid_and_inception_score_match_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore

    gen = torch.Generator().manual_seed(4)
    real = torch.rand(300, 1, 8, 8, generator=gen)
    fake = (torch.rand(300, 1, 8, 8, generator=gen) ** 2)
    features, logits = _Extractor(6).eval(), _Extractor(10).eval()
    got = metrics.image_generation_scores(metrics.FeatureExtractor("random-projection", features, logits), real, fake,
                                          batch_size=128)
    fid_ref = FrechetInceptionDistance(feature=features)
    fid_ref.update(real, real=True)
    fid_ref.update(fake, real=False)
    assert got["fid"] == pytest.approx(fid_ref.compute().item(), rel=1e-4)
    is_ref = InceptionScore(feature=logits, splits=1)
    is_ref.update(fake)
    assert got["inception_score"] == pytest.approx(is_ref.compute()[0].item(), rel=1e-5)
    assert got["feature_extractor"] == "random-projection"
