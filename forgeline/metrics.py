"""Every evaluation metric Forgeline reports, each with its formula; established libraries where they run offline.

Language modelling: perplexity, bits per byte. Generation: ExactMatch@N, BLEU (sacrebleu),
ROUGE-N/L (rouge-score), METEOR (nltk, with WordNet read from Debian's `wordnet-base`), CIDEr-D
(pycocoevalcap). Classification: accuracy, precision, recall, F1, confusion matrix. Regression:
MSE, MAE, RMSE. Retrieval / recommendation: Precision@k, Recall@k, hit rate@k, MRR, mAP, nDCG@k.
Image generation: Inception Score and FID over a pluggable `FeatureExtractor` (no Inception
weights exist offline: the extractor is a classifier we train, and its name goes in every report).

Inputs are plain Python / numpy / torch values; outputs are floats (or a dict of floats) on the
scale each metric is usually quoted on, said in each docstring. tests/test_metrics.py checks each
against the libraries' own output and published worked examples.

    from forgeline import metrics
    metrics.bleu(["the cat sat on the mat"], [["the cat is on the mat"]])   # 0..100
"""
from __future__ import annotations

import functools
import io
import math
import os
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Hashable, Mapping, Sequence

import numpy as np
import torch

# ----------------------------------------------------------------------------- language modelling


def perplexity(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> float:
    """PPL = exp( -1/N sum_i log p(x_i | x_<i) ) over the N targets != ignore_index.

    logits (..., V) predict targets (...). Per token, so it depends on the tokenizer.
    """
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                            ignore_index=ignore_index, reduction="mean")
    return math.exp(nll.item())


def perplexity_from_nll(nll_nats: float, n_tokens: int) -> float:
    """PPL = exp(NLL / N) from a summed negative log-likelihood in nats over N tokens."""
    return math.exp(nll_nats / n_tokens)


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """BPB = NLL / (ln 2 * B): the summed NLL in bits over the B UTF-8 bytes the predicted tokens
    stand for. Unlike perplexity it compares models with different tokenizers."""
    return nll_nats / math.log(2) / n_bytes


# ----------------------------------------------------------------------------- generation


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation (Rajpurkar et al. 2016): lower case, drop punctuation, the
    articles a/an/the and extra whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_at_n(candidates: Sequence[Sequence[str]], references: Sequence[str | Sequence[str]],
                     n: int = 1, normalize: bool = True) -> float:
    """EM@N = 1/Q sum_q 1[ any of the first n candidates of q equals any reference of q ], in [0, 1].

    candidates[q]: the generations for question q, best (or first sampled) first; references[q]:
    one string or several accepted ones. normalize: compare `normalize_answer` forms (SQuAD).
    With n=1 this is SQuAD's exact match; with n samples it is pass@n-style "any of n is right".
    """
    if len(candidates) != len(references) or not candidates:
        raise ValueError("need one list of candidates per reference, and at least one")
    norm = normalize_answer if normalize else (lambda s: s)
    hits = 0
    for cands, refs in zip(candidates, references):
        refs = [refs] if isinstance(refs, str) else refs
        accepted = {norm(r) for r in refs}
        hits += any(norm(c) in accepted for c in cands[:n])
    return hits / len(candidates)


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], tokenize: str = "13a") -> float:
    """Corpus BLEU (Papineni et al. 2002) on 0..100, as sacrebleu computes it:

        BLEU = BP * exp( sum_{n=1..4} 1/4 log p_n ),   BP = min(1, exp(1 - r / c))

    p_n: clipped n-gram matches / candidate n-grams, summed over the corpus; c: candidate length,
    r: closest reference length, summed. references[i]: the references of hypothesis i (any
    number per hypothesis). tokenize: sacrebleu's tokenizer ("13a" = WMT's mteval-v13a).
    """
    import sacrebleu

    n_refs = max(len(r) for r in references)
    # sacrebleu wants one stream per reference slot; a missing reference is None
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(n_refs)]
    return sacrebleu.corpus_bleu(list(hypotheses), streams, tokenize=tokenize).score


def rouge(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
          types: Sequence[str] = ("rouge1", "rouge2", "rougeL"), use_stemmer: bool = False) -> dict[str, float]:
    """Mean ROUGE F1 (Lin 2004) over pairs, per type, in [0, 1], via Google's rouge-score.

    ROUGE-N: P = |n-grams in both| / |hypothesis n-grams|, R = the same / |reference n-grams|
    (counts clipped); ROUGE-L: the same with the longest common subsequence length in place of
    the overlap. F1 = 2PR / (P + R). With several references, each hypothesis takes its best one.
    Keys: each type, plus "<type>_precision" / "<type>_recall".
    """
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer)
    sums = Counter()
    for hyp, refs in zip(hypotheses, references, strict=True):
        scores = scorer.score_multi(list(refs), hyp)
        for t in types:
            sums[t] += scores[t].fmeasure
            sums[f"{t}_precision"] += scores[t].precision
            sums[f"{t}_recall"] += scores[t].recall
    return {k: v / len(hypotheses) for k, v in sums.items()}


# METEOR's synonym stage needs WordNet. nltk downloads it at run time; Debian's `wordnet-base`
# ships the same WordNet 3.0 database files, except `lexnames` (the 45 lexicographer file names,
# listed in the lexnames(5WN) man page), which nltk's reader opens first: we supply it.
WORDNET_DIR = os.environ.get("FORGELINE_WORDNET", "/usr/share/wordnet")
_LEXNAMES = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
             "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
             "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
             "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
             "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
             "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather "
             "adj.ppl").split()
_LEX_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


@functools.cache
def wordnet(root: str = WORDNET_DIR):
    """nltk's WordNet reader over a WordNet 3.0 database folder (Debian: apt-get install wordnet-base)."""
    import warnings

    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    if not (Path(root) / "data.noun").exists():
        raise FileNotFoundError(f"no WordNet database in {root}: `apt-get install wordnet-base`, "
                                "or point FORGELINE_WORDNET at a WordNet 3.0 dict folder")
    lexnames = "".join(f"{i:02d}\t{name}\t{_LEX_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(_LEXNAMES))

    class _Reader(WordNetCorpusReader):
        def open(self, fileid):
            if fileid == "lexnames" and not (Path(root) / "lexnames").exists():
                return io.StringIO(lexnames)
            return super().open(fileid)

        def map_wn(self, version="wordnet"):
            return None  # maps other WordNet versions' synsets for Open Multilingual WordNet: unused

    if root not in nltk.data.path:
        nltk.data.path.append(root)  # nltk reads only below its data paths (nltk.pathsec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": not needed
        return _Reader(root, None)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text)


def meteor(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean sentence METEOR (Banerjee & Lavie 2005) in [0, 1], nltk's implementation.

    Unigrams are aligned in stages (exact, Porter stem, WordNet synonym); with m matches, P = m/|hyp|,
    R = m/|ref|, Fmean = P R / (alpha P + (1 - alpha) R), and a fragmentation penalty
    Pen = gamma (chunks / m)^beta for the number of contiguous matched chunks:
    METEOR = Fmean (1 - Pen); alpha = 0.9, beta = 3, gamma = 0.5. Best reference per hypothesis.
    """
    from nltk.translate.meteor_score import meteor_score

    wn = wordnet()
    scores = [meteor_score([_words(r) for r in refs], _words(h), wordnet=wn)
              for h, refs in zip(hypotheses, references, strict=True)]
    return float(np.mean(scores))


def cider(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D (Vedantam et al. 2015), as pycocoevalcap computes it (COCO's 0..10 scale):

        CIDEr-D_n(c, S) = 10/|S| sum_s  exp(-(l_c - l_s)^2 / (2 sigma^2)) * min(g_n(c), g_n(s)) . g_n(s)
                                                                        / (|g_n(c)| |g_n(s)|)
        CIDEr-D = 1/4 sum_{n=1..4} CIDEr-D_n,  averaged over the corpus

    g_n: TF-IDF vectors of n-grams, IDF over the corpus's reference sets; sigma = 6. Lowercased
    word tokens (pycocoevalcap's Java PTB tokenizer is not used).
    """
    from pycocoevalcap.cider.cider import Cider

    def tok(s: str) -> str:
        return " ".join(w for w in _words(s.lower()) if w not in string.punctuation)

    gts = {i: [tok(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [tok(h)] for i, h in enumerate(hypotheses)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


# ----------------------------------------------------------------------------- classification


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """C[i, j] = number of examples of true class i predicted as class j; (num_classes, num_classes)."""
    t, p = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    return np.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def classification(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int,
                   average: str = "macro") -> dict[str, float]:
    """Accuracy, precision, recall and F1 in [0, 1] from the confusion matrix C:

        accuracy = trace(C) / sum(C);  per class k: P_k = C[k,k] / sum_i C[i,k],
        R_k = C[k,k] / sum_j C[k,j],   F1_k = 2 P_k R_k / (P_k + R_k)   (0 where a denominator is 0)

    average="macro": the unweighted mean over classes; "micro": P, R, F1 of the pooled counts
    (each equals accuracy for single-label data); "weighted": the mean weighted by class support.
    """
    c = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    tp, pred, support = np.diag(c), c.sum(0), c.sum(1)
    out = {"accuracy": float(tp.sum() / c.sum())}
    if average == "micro":
        p = r = tp.sum() / c.sum()
        return {**out, "precision": float(p), "recall": float(r), "f1": float(p)}
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(pred > 0, tp / pred, 0.0)
        r = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    if average == "macro":
        w = np.full(num_classes, 1 / num_classes)
    elif average == "weighted":
        w = support / support.sum()
    else:
        raise ValueError(f"average={average!r}: macro, micro or weighted")
    return {**out, "precision": float(w @ p), "recall": float(w @ r), "f1": float(w @ f1)}


# ----------------------------------------------------------------------------- regression


def regression(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, float]:
    """MSE = mean (y - yhat)^2, MAE = mean |y - yhat|, RMSE = sqrt(MSE)."""
    err = np.asarray(y_pred, dtype=np.float64) - np.asarray(y_true, dtype=np.float64)
    mse = float(np.mean(err ** 2))
    return {"mse": mse, "mae": float(np.mean(np.abs(err))), "rmse": math.sqrt(mse)}


# ----------------------------------------------------------------------------- retrieval


def _check_queries(ranked, relevant):
    if len(ranked) != len(relevant) or not ranked:
        raise ValueError("need one ranked list and one relevance set per query, and at least one query")


def precision_at_k(ranked: Sequence[Sequence[Hashable]], relevant: Sequence[Collection[Hashable]], k: int) -> float:
    """P@k = mean over queries of |relevant in the top k| / k."""
    _check_queries(ranked, relevant)
    return float(np.mean([sum(d in rel for d in r[:k]) / k for r, rel in zip(ranked, relevant)]))


def recall_at_k(ranked: Sequence[Sequence[Hashable]], relevant: Sequence[Collection[Hashable]], k: int) -> float:
    """R@k = mean over queries of |relevant in the top k| / |relevant| (queries with none count 0)."""
    _check_queries(ranked, relevant)
    return float(np.mean([sum(d in rel for d in r[:k]) / len(rel) if rel else 0.0
                          for r, rel in zip(ranked, relevant)]))


def hit_rate_at_k(ranked: Sequence[Sequence[Hashable]], relevant: Sequence[Collection[Hashable]], k: int) -> float:
    """HR@k = fraction of queries with at least one relevant item in the top k."""
    _check_queries(ranked, relevant)
    return float(np.mean([any(d in rel for d in r[:k]) for r, rel in zip(ranked, relevant)]))


def mrr(ranked: Sequence[Sequence[Hashable]], relevant: Sequence[Collection[Hashable]], k: int | None = None) -> float:
    """MRR = mean over queries of 1 / rank of the first relevant item (0 if none in the top k)."""
    _check_queries(ranked, relevant)
    rr = []
    for r, rel in zip(ranked, relevant):
        rank = next((i for i, d in enumerate(r[:k], 1) if d in rel), None)
        rr.append(1 / rank if rank else 0.0)
    return float(np.mean(rr))


def mean_average_precision(ranked: Sequence[Sequence[Hashable]], relevant: Sequence[Collection[Hashable]],
                           k: int | None = None) -> float:
    """mAP = mean over queries of AP, AP = 1/|relevant| sum_{i <= k: d_i relevant} P@i (trec_eval's
    definition: relevant items not in the top k add 0). torchmetrics' RetrievalMAP(top_k) divides
    by the relevant items found in the top k instead; without a cutoff the two agree."""
    _check_queries(ranked, relevant)
    aps = []
    for r, rel in zip(ranked, relevant):
        hits, total = 0, 0.0
        for i, d in enumerate(r[:k], 1):
            if d in rel:
                hits += 1
                total += hits / i
        aps.append(total / len(rel) if rel else 0.0)
    return float(np.mean(aps))


def dcg(gains: Sequence[float]) -> float:
    """DCG = sum_i rel_i / log2(i + 1), i = 1.. (Järvelin & Kekäläinen 2002, linear gains)."""
    return float(sum(g / math.log2(i + 1) for i, g in enumerate(gains, 1)))


def ndcg_at_k(ranked: Sequence[Sequence[Hashable]], relevance: Sequence[Mapping[Hashable, float]],
              k: int | None = None) -> float:
    """nDCG@k = mean over queries of DCG@k of the ranking / DCG@k of the ideal ranking.

    relevance[q]: item -> graded relevance (missing items: 0); the ideal ranking sorts all the
    judged items of q by grade. A query with no relevant item scores 0.
    """
    _check_queries(ranked, relevance)
    scores = []
    for r, rel in zip(ranked, relevance):
        ideal = dcg(sorted(rel.values(), reverse=True)[:k])
        scores.append(dcg([rel.get(d, 0.0) for d in r[:k]]) / ideal if ideal > 0 else 0.0)
    return float(np.mean(scores))


# ----------------------------------------------------------------------------- image generation


@dataclass(frozen=True)
class FeatureExtractor:
    """The network IS and FID look through, named in every report (scores from different
    extractors are not comparable). The published scores use Inception-v3 on ImageNet; offline we
    train our own classifier on the pipeline's data and pass its two views here."""

    name: str                                            # e.g. "forgeline-cnn-mnist@<mlflow run id>"
    features: Callable[[torch.Tensor], torch.Tensor]     # images -> (N, D) penultimate features (FID)
    logits: Callable[[torch.Tensor], torch.Tensor]       # images -> (N, C) class logits (IS)


def inception_score(logits: torch.Tensor, splits: int = 1) -> tuple[float, float]:
    """IS = exp( E_x KL( p(y|x) || p(y) ) ) (Salimans et al. 2016), p(y) the mean of p(y|x) over the
    split; returns (mean, std) over `splits` equal splits of logits (N, C). 1 <= IS <= C."""
    probs = logits.double().softmax(dim=-1)
    scores = []
    for part in probs.chunk(splits):
        marginal = part.mean(dim=0, keepdim=True)
        kl = (part * (part.clamp_min(1e-30).log() - marginal.log())).sum(dim=-1)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians (Dowson & Landau 1982);
    Tr((S1 S2)^(1/2)) = sum of the square roots of S1 S2's eigenvalues (real, >= 0 for PSD S1, S2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    eig = np.linalg.eigvals(s1 @ s2)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def fid(real_features: torch.Tensor | np.ndarray, fake_features: torch.Tensor | np.ndarray) -> float:
    """FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted (mean, unbiased
    covariance) to the extractor's features of real and of generated images, (N, D) each."""
    a = np.asarray(real_features, dtype=np.float64)
    b = np.asarray(fake_features, dtype=np.float64)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


@torch.no_grad()
def image_generation_scores(extractor: FeatureExtractor, real: torch.Tensor, fake: torch.Tensor,
                            batch_size: int = 256, splits: int = 1) -> dict[str, float | str]:
    """FID of `fake` against `real` and the Inception Score of `fake`, through `extractor`."""
    def run(fn, images):
        return torch.cat([fn(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])

    is_mean, is_std = inception_score(run(extractor.logits, fake), splits)
    return {"fid": fid(run(extractor.features, real), run(extractor.features, fake)),
            "inception_score": is_mean, "inception_score_std": is_std, "feature_extractor": extractor.name}
