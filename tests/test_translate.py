"""The translation pipeline: seq2seq model and decoding, MLM masking, pair filters and the split by
document, the language detector, the /v1/translate route's answers, and one run of the whole
pipeline on a tiny configuration (slow)."""
from __future__ import annotations

import gzip
import json

import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient

from models.seq2seq import Seq2Seq, Seq2SeqConfig, beam_search, encoder_input, greedy, pad_batch
from tasks.mt_data import MTDataConfig, build_pairs, build_mono, drop_reason, read_raw
from tasks.mt_pretrain import mask_tokens, mlm_batch
from tasks.mt_validate import detect_language
from tests.conftest import cli_overrides, run_in, stage_lines


def tiny_model(seed: int = 0, vocab: int = 300) -> Seq2Seq:
    torch.manual_seed(seed)
    config = Seq2SeqConfig.for_tokenizer(vocab, ["en", "fr", "es"], d_model=32, n_heads=4, n_enc_layers=2,
                                         n_dec_layers=2, d_ff=64, max_len=32, dropout=0.0)
    return Seq2Seq(config).eval()


def sources(model: Seq2Seq) -> torch.Tensor:
    c = model.config
    rows = [list(range(10, 22)), list(range(40, 45)), [7, 7, 9, 100, 250, 3, 8]]
    return pad_batch([encoder_input(r, lang, c) for r, lang in zip(rows, ["fr", "es", "fr"])], c.pad_id)


# ----------------------------------------------------------------------------- model and decoding


def test_shapes_and_loss():
    model = tiny_model()
    c = model.config
    assert c.vocab_size == 300 + 2 + 3 and c.bos_id == 300 and c.mask_id == 301 and c.lang_ids["es"] == 304
    src = sources(model)
    memory, mask = model.encode(src)
    assert memory.shape == (3, src.size(1), 32) and mask.shape == (3, 1, 1, src.size(1))
    tgt_in = torch.tensor([[c.bos_id, 11, 12, 13], [c.bos_id, 41, c.pad_id, c.pad_id], [c.bos_id, 5, 6, 7]])
    tgt_out = torch.tensor([[11, 12, 13, c.eos_id], [41, c.eos_id, c.pad_id, c.pad_id], [5, 6, 7, c.eos_id]])
    logits, loss = model(src, tgt_in, tgt_out)
    assert logits.shape == (3, 4, c.vocab_size) and loss.ndim == 0 and torch.isfinite(loss)
    assert abs(loss.item() - torch.log(torch.tensor(float(c.vocab_size))).item()) < 0.5  # ~uniform at init
    # padding a batch changes no real position's logits
    alone, _ = model(src[1:2, :7], tgt_in[1:2, :2])
    assert torch.allclose(alone[0], logits[1, :2], atol=1e-5)
    # causal: a later target token does not change an earlier position
    changed = tgt_in.clone()
    changed[:, 3] = 99
    assert torch.allclose(model(src, changed)[0][:, :3], logits[:, :3], atol=1e-6)


def test_kv_cache_decoding_equals_recomputing():
    model = tiny_model(1)
    src = sources(model)
    ids, conf = greedy(model, src, 12, use_cache=True)
    ids_ref, conf_ref = greedy(model, src, 12, use_cache=False)
    assert ids == ids_ref and all(len(r) > 0 for r in ids)
    assert conf == pytest.approx(conf_ref, abs=1e-4)
    beams, bconf = beam_search(model, src, 12, width=3, length_penalty=0.6, use_cache=True)
    beams_ref, bconf_ref = beam_search(model, src, 12, width=3, length_penalty=0.6, use_cache=False)
    assert beams == beams_ref and bconf == pytest.approx(bconf_ref, abs=1e-4)


def test_beam_width_one_is_greedy_and_wider_beams_score_no_worse():
    model = tiny_model(2)
    src = sources(model)
    assert beam_search(model, src, 12, width=1)[0] == greedy(model, src, 12)[0]

    def total_logp(ids: list[list[int]]) -> torch.Tensor:  # log P(ids + EOS | src) by teacher forcing
        c = model.config
        tgt_in = pad_batch([[c.bos_id, *r] for r in ids], c.pad_id)
        tgt_out = pad_batch([[*r, c.eos_id] for r in ids], c.pad_id)
        logp = torch.log_softmax(model(src, tgt_in)[0], -1).gather(-1, tgt_out[..., None])[..., 0]
        return (logp * (tgt_out != c.pad_id)).sum(-1)

    # with no length penalty beam search maximises log P: width 4 finds at least greedy's
    wide = beam_search(model, src, 12, width=4, length_penalty=0.0)[0]
    assert (total_logp(wide) >= total_logp(greedy(model, src, 12)[0]) - 1e-4).all()


# ----------------------------------------------------------------------------- MLM


def test_mlm_masks_a_subset_and_the_decoder_sees_the_sentence():
    model = tiny_model()
    c = model.config
    g = torch.Generator().manual_seed(0)
    ids = list(range(20, 40))
    masked = mask_tokens(ids, 0.25, c.mask_id, g)
    hidden = [i for i, t in enumerate(masked) if t == c.mask_id]
    assert len(hidden) == 5 and all(masked[i] == ids[i] for i in range(20) if i not in hidden)
    assert mask_tokens([5], 0.1, c.mask_id, g) == [c.mask_id]  # at least one token masked
    src, tgt_in, tgt_out = mlm_batch([("fr", ids), ("en", [7, 8, 9, 10])], c, 0.5, torch.Generator().manual_seed(1))
    assert src[0, 0] == c.lang_ids["fr"] and src[1, 0] == c.lang_ids["en"]
    assert src[0, 21] == c.eos_id and (src[0, 1:21] == c.mask_id).sum() == 10
    assert tgt_in[0].tolist() == [c.bos_id, *ids] and tgt_out[0].tolist() == [*ids, c.eos_id]
    assert tgt_in[1].tolist()[:5] == [c.bos_id, 7, 8, 9, 10] and tgt_out[1].tolist()[:5] == [7, 8, 9, 10, c.eos_id]
    assert (tgt_out[1, 5:] == c.pad_id).all()
    # the loss of a batch is finite and differentiable
    _, loss = model.train()(src, tgt_in, tgt_out)
    loss.backward()
    assert model.embed.weight.grad is not None


# ----------------------------------------------------------------------------- data


def test_filters_drop_what_is_not_a_sentence():
    cfg = MTDataConfig()
    assert drop_reason("Could not open the file.", "Impossible d'ouvrir le fichier.", cfg) is None
    assert drop_reason("Cannot open %s for reading", "Impossible d'ouvrir %s", cfg) == "format_string"
    assert drop_reason("Remove {name} from the list", "Retirer {name} de la liste", cfg) == "format_string"
    assert drop_reason("Press <b>OK</b> to go on", "Appuyez sur <b>OK</b>", cfg) == "markup"
    assert drop_reason("Cancel", "Annuler", cfg) == "label"
    assert drop_reason("Open file", "Ouvrir le fichier", cfg) == "label"
    assert drop_reason("Debian GNU Linux rocks", "Debian GNU Linux rocks", cfg) == "untranslated"
    assert drop_reason("Show all the files here", "Afficher", cfg) == "length_ratio"
    assert drop_reason("--verbose prints more lines", "--verbose affiche plus de lignes", cfg) == "not_a_sentence"
    assert drop_reason("Open the file", "  ", cfg) == "empty"


def write_tsv(path, rows):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(f"{a}\t{b}\n" for a, b in rows)


def test_split_is_by_document_and_test_sources_are_never_trained_on(tmp_path):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    # a catalog of 400 rows (blocks of 40 = 10 documents), the same English in the es catalog, and a
    # Debian Reference file whose chapters start at "Table of Contents"
    cat = [(f"the {w} value number {i} was read", f"la valeur {w} numéro {i} a été lue") for i in range(40)
           for w in words]
    write_tsv(tmp_path / "mo_en_fr.tsv.gz", cat)
    write_tsv(tmp_path / "mo_en_es.tsv.gz", [(a, f"el valor {a[4:]} fue leído") for a, _ in cat])
    debref = []
    for ch in range(6):
        debref += [("Table of Contents", "Table des matières")]
        debref += [(f"chapter {ch} explains the topic {i} here", f"le chapitre {ch} explique le sujet {i} ici")
                   for i in range(5)]
    write_tsv(tmp_path / "debref_en_fr.tsv.gz", debref)
    cfg = MTDataConfig(raw_dir=str(tmp_path), block_rows=40, test_share=0.3, val_share=0.1)
    raw = read_raw(cfg.raw_dir, cfg.languages, cfg.block_rows)
    assert set(raw.loc[raw["corpus"] == "debref", "doc_id"]) == {f"debref:ch{c:02d}" for c in range(6)}
    pairs, counts = build_pairs(raw, cfg)
    assert counts["rows"] == len(raw) == 2 * 400 + 36
    splits = pairs.groupby("doc_id")["split"].nunique()
    assert (splits == 1).all() and set(pairs["split"]) == {"train", "val", "test"}
    test_src = set(pairs.loc[pairs["split"] == "test", "src"])
    assert test_src and not test_src & set(pairs.loc[pairs["split"] != "test", "src"])
    assert counts["dropped_test_source_elsewhere"] > 0  # the es copy of an English test sentence
    assert not pairs.duplicated(["tgt_lang", "src"]).any()
    mono = build_mono(raw, pairs, cfg)
    mono_lines = {line for text in mono["text"] for line in text.split("\n")}
    assert not test_src & mono_lines and set(mono["lang"]) == {"en", "fr", "es"}


def test_language_detector():
    assert detect_language("The file is not in the list of packages") == "en"
    assert detect_language("Le fichier est dans la liste des paquets") == "fr"
    assert detect_language("El archivo no está en la lista de los paquetes") == "es"
    assert detect_language("Die Datei ist nicht in der Liste") == "de"
    assert detect_language("GNOME 3.38") is None


# ----------------------------------------------------------------------------- the route


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from safetensors.torch import save_model

    import serve.translate as route
    from serve.app import create_app
    from tasks.tokenizer import train_bpe

    folder = tmp_path_factory.mktemp("mt_model")
    text = ["The file could not be opened.", "Le fichier n'a pas pu être ouvert.", "El archivo no se pudo abrir."] * 20
    tok = train_bpe(text, vocab_size=300)
    tok.save(str(folder / "tokenizer.json"))
    model = tiny_model(3, vocab=tok.get_vocab_size())
    save_model(model, str(folder / "model.safetensors"))
    from dataclasses import asdict
    (folder / "config.json").write_text(json.dumps(asdict(model.config)))
    saved = route.MODEL
    route.MODEL = route._Model(folder)
    yield TestClient(create_app([("translate", route.router)]))
    route.MODEL = saved


def test_route_translates_sentence_by_sentence(client):
    r = client.post("/v1/translate", json={"text": "The file could not be opened. It is gone!\nAgain",
                                           "source": "en", "target": "fr", "beam": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [s["source"] for s in body["sentences"]] == ["The file could not be opened.", "It is gone!", "Again"]
    assert all(s["confidence"] <= 0 for s in body["sentences"]) and body["beam"] == 2
    assert body["translation"] == " ".join(s["translation"] for s in body["sentences"])
    greedy_body = client.post("/v1/translate", json={"text": "Again", "target": "es", "beam": 1}).json()
    assert greedy_body["source"] == "en" and len(greedy_body["sentences"]) == 1


@pytest.mark.parametrize("body, message", [
    ({"text": "Hello there.", "source": "en", "target": "de"}, "unsupported language pair en->de; supported: en->es, en->fr"),
    ({"text": "Bonjour.", "source": "fr", "target": "es"}, "unsupported language pair fr->es"),
    ({"text": "x" * 5001, "target": "fr"}, "at most 5000"),
    ({"text": "Go. " * 65, "target": "fr"}, "65 sentences; at most 64"),
    ({"text": "word " * 40, "target": "fr"}, "tokens; at most 30"),
    ({"text": "  \n ", "target": "fr"}, "text is empty"),
    ({"text": "Hello there.", "target": "fr", "beam": 0}, "beam=0"),
])
def test_route_400s_name_the_problem(client, body, message):
    r = client.post("/v1/translate", json=body)
    assert r.status_code == 400 and message in r.json()["detail"], r.text


# ----------------------------------------------------------------------------- the pipeline


TINY = {
    "mt_tokenizer": {"vocab_size": 600},
    "mt_pretrain": {"d_model": 32, "n_heads": 2, "n_enc_layers": 1, "n_dec_layers": 1, "d_ff": 64, "max_len": 48,
                    "crop": 24, "max_steps": 6, "batch_size": 8, "eval_interval": 3, "ckpt_interval": 3,
                    "eval_batches": 1, "log_interval": 3, "warmup_steps": 2},
    "mt_train": {"max_steps": 6, "batch_size": 8, "eval_interval": 3, "ckpt_interval": 3, "eval_batches": 1,
                 "log_interval": 3, "warmup_steps": 2},
    "mt_eval": {"max_sentences": 6, "beam_width": 2, "examples": 2},
}
STAGES = ["mt_data", "mt_validate", "mt_tokenizer", "mt_pretrain", "mt_train", "mt_eval"]


@pytest.mark.slow
def test_pipeline_end_to_end_on_a_tiny_config(workspace):
    ws = workspace
    out = run_in(ws, "-m", "flows.translate", "--no-push", *cli_overrides(TINY))
    assert stage_lines(out.stdout, STAGES) == {s: "ran" for s in STAGES}, out.stdout[-3000:]
    pairs = pd.read_parquet(ws / "data" / "mt_data" / "pairs.parquet")
    assert pairs.groupby("doc_id")["split"].nunique().max() == 1 and set(pairs["tgt_lang"]) == {"fr", "es"}
    assert json.loads((ws / "data" / "mt_validate" / "result.json").read_text())["success"]
    summary = json.loads((ws / "data" / "mt_train" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["init"] == "pretrained"
    metrics = json.loads((ws / "data" / "mt_eval" / "metrics.json").read_text())
    assert sorted(metrics["directions"]) == ["en-es", "en-fr"]
    for r in metrics["directions"].values():
        assert r["sentences"] == 6 and {"bleu", "chrf", "rougeL", "meteor"} <= set(r["beam"]) == set(r["greedy"])
    report = (ws / "data" / "mt_eval" / "report.md").read_text()
    assert "best 2 beam translations" in report and "worst 2 beam translations" in report
    # resumed, not retrained: a second run skips every stage
    again = run_in(ws, "-m", "flows.translate", "--no-push", *cli_overrides(TINY))
    assert stage_lines(again.stdout, STAGES) == {s: "skipped" for s in STAGES}, again.stdout[-3000:]


def test_mt_train_resumes_bit_for_bit(tmp_path, capsys):
    """Killed after its step-2 checkpoint, a rerun resumes there and ends with the uninterrupted weights."""
    import hashlib
    import shutil
    from dataclasses import asdict

    from safetensors.torch import load_file, save_model

    from tasks.mt_train import GateClosed, MTTrainConfig, mt_train
    from tasks.tokenizer import train_bpe

    rows = [("The file could not be opened.", "Le fichier n'a pas pu être ouvert.", "fr"),
            ("The disk is full again.", "El disco está lleno otra vez.", "es"),
            ("Remove the old package first.", "Supprimez d'abord l'ancien paquet.", "fr")] * 8
    pairs = pd.DataFrame({"pair_id": [f"p{i}" for i in range(len(rows))], "doc_id": "d", "corpus": "mo", "src_lang": "en",
                          "tgt_lang": [r[2] for r in rows], "src": [r[0] for r in rows], "tgt": [r[1] for r in rows],
                          "split": ["train"] * 20 + ["val"] * 4})
    pairs.to_parquet(tmp_path / "pairs.parquet")
    pre = tmp_path / "pre"
    pre.mkdir()
    tok = train_bpe([t for r in rows for t in r[:2]], vocab_size=300)
    tok.save(str(pre / "tokenizer.json"))
    model = tiny_model(4, vocab=tok.get_vocab_size())
    save_model(model, str(pre / "model.safetensors"))
    (pre / "config.json").write_text(json.dumps(asdict(model.config)))
    cfg = MTTrainConfig(pairs=str(tmp_path / "pairs.parquet"), validation=str(tmp_path / "result.json"),
                        pretrained_dir=str(pre), out_dir=str(tmp_path / "out"), ckpt_dir=str(tmp_path / "ckpt"),
                        batch_size=4, max_steps=4, eval_interval=2, ckpt_interval=2, eval_batches=1, log_interval=2,
                        warmup_steps=1, dropout=0.1)
    with pytest.raises(GateClosed, match="no validation report"):
        mt_train(cfg)
    sha = hashlib.sha256((tmp_path / "pairs.parquet").read_bytes()).hexdigest()
    (tmp_path / "result.json").write_text(json.dumps({"success": True, "pairs_sha256": sha}))
    first = mt_train(cfg)
    weights = load_file(tmp_path / "out" / "model.safetensors")
    (root,) = (tmp_path / "ckpt").iterdir()
    shutil.rmtree(root / "step_00000004")  # killed between the step-2 checkpoint and the end
    shutil.rmtree(tmp_path / "out")
    capsys.readouterr()
    second = mt_train(cfg)
    assert "step_00000002 at step 2" in capsys.readouterr().out  # resumed, not retrained from step 0
    again = load_file(tmp_path / "out" / "model.safetensors")
    assert second["val_loss"] == first["val_loss"]
    assert all(torch.equal(weights[k], again[k]) for k in weights)
