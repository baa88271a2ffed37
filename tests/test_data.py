"""Offline tests for flatray.data: local GLUE/SQuAD files, a tiny trained WordPiece tokenizer, the toy task."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertTokenizerFast

from flatray import data
from flatray.data import TASKS, DataError

CONTEXT = (
    "The Eiffel Tower is a wrought iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower. "
    "Locally nicknamed La dame de fer, it was constructed from 1887 to 1889 as the centerpiece of the "
    "1889 World's Fair. Although initially criticised by some of France's leading artists and intellectuals "
    "for its design, it has since become a global cultural icon of France and one of the most recognisable "
    "structures in the world. The tower received 5,889,000 visitors in 2022."
)
QUESTIONS = [  # (id, question, answer): answers early, in the middle and at the very end of the context
    ("q1", "Where is the Eiffel Tower?", "Paris, France"),
    ("q2", "Who was the tower named after?", "Gustave Eiffel"),
    ("q3", "When was it constructed?", "from 1887 to 1889"),
    ("q4", " How many visitors did the tower receive in 2022?", "5,889,000"),
]
SQUAD_QA = [(i, q, a, CONTEXT.index(a)) for i, q, a in QUESTIONS]

SENTENCES = ["a man is playing a guitar", "the cat sat on the mat", "what is the capital of france?",
             "the company said profits rose", "two dogs are playing with a ball", "none", "NA",
             "he did not believe the story was true at all, even after the report was published"]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=2000, special_tokens=specials)
    tok.train_from_iterator(data.toy_corpus() + SENTENCES + [CONTEXT] + [q for _, q, _ in QUESTIONS], trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return BertTokenizerFast(tokenizer_file=str(path), unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]")


def _glue_frame(spec, n, seed):
    rng = np.random.default_rng(seed)
    a, b = spec.text_keys
    cols = {a: [SENTENCES[i] for i in rng.integers(len(SENTENCES), size=n)]}
    if b:
        cols[b] = [SENTENCES[i] for i in rng.integers(len(SENTENCES), size=n)]
    if spec.kind == "regression":
        cols["label"] = np.round(rng.uniform(0, 5, size=n), 3)
    else:
        cols["label"] = rng.integers(spec.num_labels, size=n)
    cols["idx"] = np.arange(n)
    return pd.DataFrame(cols)


def _write(df, path):
    ext = path.suffix
    if ext == ".csv":
        df.to_csv(path, index=False)
    elif ext == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    elif ext == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    elif ext == ".json":
        df.to_json(path, orient="records")  # one json array
    else:
        df.to_parquet(path)
    return str(path)


def _glue_files(spec, tmp_path, ext, n_train=24, n_eval=10):
    files, frames = {}, {}
    for k, split in enumerate(("train",) + spec.eval_splits):
        frames[split] = _glue_frame(spec, n_train if split == "train" else n_eval, seed=k)
        files[split] = _write(frames[split], tmp_path / f"{spec.name}_{split}.{ext}")
    return files, frames


def test_task_registry():
    assert set(TASKS) == {"mnli", "qqp", "qnli", "sst2", "rte", "mrpc", "cola", "stsb", "squad", "toy", "toy-topic",
                          "rotten-tomatoes", "convention-party"}
    assert TASKS["stsb"].kind == "regression" and TASKS["stsb"].num_labels == 1
    assert TASKS["mnli"].eval_splits == ("validation_matched", "validation_mismatched")
    assert TASKS["cola"].main_metric == "matthews" and TASKS["stsb"].main_metric == "pearson"
    assert TASKS["squad"].main_metric == "f1" and TASKS["squad"].defaults["doc_stride"] == 128
    assert {t: TASKS[t].defaults["epochs"] for t in ("rte", "mrpc", "cola", "stsb", "mnli", "qqp", "qnli", "sst2")} \
        == dict(rte=10, mrpc=10, cola=10, stsb=10, mnli=3, qqp=3, qnli=3, sst2=3)
    assert TASKS["toy"].defaults == dict(max_length=32, batch_size=32, lr=1e-3, epochs=3)


@pytest.mark.parametrize("task,ext", [("sst2", "csv"), ("mrpc", "tsv"), ("stsb", "jsonl"), ("stsb", "json"),
                                      ("mnli", "parquet"), ("cola", "csv")])
def test_glue_from_files_tokenize_and_collate(tokenizer, tmp_path, task, ext):
    spec = TASKS[task]
    files, frames = _glue_files(spec, tmp_path, ext)
    raw = data.load_raw(spec, source="files", data_files=files)
    assert set(raw) == {"train", *spec.eval_splits}
    assert raw["train"][spec.text_keys[0]] == list(frames["train"][spec.text_keys[0]])  # "none"/"NA" stay text

    tok = data.tokenize(spec, raw, tokenizer, max_length=12, max_eval_samples=7)
    inputs = {"input_ids", "attention_mask", "token_type_ids"}
    assert set(tok.train.column_names) == inputs | {"labels"}
    assert set(tok.evals) == set(spec.eval_splits)
    for split, ev in tok.evals.items():
        assert set(ev.features.column_names) == inputs
        assert len(ev.features) == len(ev.examples) == len(ev.labels) == 7 and ev.meta is None
        np.testing.assert_allclose(ev.labels, frames[split]["label"][:7], rtol=1e-6)
        assert ev.labels.dtype == (np.float32 if spec.kind == "regression" else np.int64)
    assert max(len(x) for x in tok.train["input_ids"]) <= 12
    if spec.text_keys[1]:  # pairs: segment B gets token type 1
        assert any(1 in t for t in tok.train["token_type_ids"])

    collate = data.collator(tokenizer)
    feats = [tok.train[i] for i in range(8)]
    batch = collate(feats)
    longest = max(len(f["input_ids"]) for f in feats)
    for key in inputs:
        assert batch[key].shape == (8, longest) and batch[key].dtype == torch.long
    assert batch["labels"].dtype == (torch.float32 if spec.kind == "regression" else torch.long)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths == [len(f["input_ids"]) for f in feats]
    for row, n in zip(batch["input_ids"], lengths):
        assert (row[n:] == tokenizer.pad_token_id).all()
    eval_batch = collate([tok.evals[spec.eval_splits[0]].features[i] for i in range(3)])
    assert "labels" not in eval_batch


def test_regression_labels_stay_float_when_integer_valued(tokenizer, tmp_path):
    spec = TASKS["stsb"]
    files, frames = _glue_files(spec, tmp_path, "csv")
    frames["train"]["label"] = np.arange(len(frames["train"])) % 6  # ints in the file
    files["train"] = _write(frames["train"], tmp_path / "int_train.csv")
    tok = data.tokenize(spec, data.load_raw(spec, "files", data_files=files), tokenizer, max_length=16)
    assert data.collator(tokenizer)([tok.train[i] for i in range(4)])["labels"].dtype == torch.float32


def test_missing_split_is_a_clear_error(tmp_path):
    spec = TASKS["mnli"]
    files, _ = _glue_files(spec, tmp_path, "csv")
    del files["validation_mismatched"]
    with pytest.raises(DataError, match="validation_mismatched.*premise, hypothesis, label"):
        data.load_raw(spec, source="files", data_files=files)


def test_missing_column_is_a_clear_error(tmp_path):
    spec = TASKS["mrpc"]
    files, frames = _glue_files(spec, tmp_path, "csv")
    files["validation"] = _write(frames["validation"].drop(columns="sentence2"), tmp_path / "bad.csv")
    with pytest.raises(DataError, match="split 'validation' has no column 'sentence2'"):
        data.load_raw(spec, source="files", data_files=files)


def test_bad_labels_and_bad_format_are_clear_errors(tmp_path):
    spec = TASKS["sst2"]
    files, frames = _glue_files(spec, tmp_path, "csv")
    frames["validation"]["label"] = -1  # what a GLUE test split looks like
    files["validation"] = _write(frames["validation"], tmp_path / "test_like.csv")
    with pytest.raises(DataError, match="invalid labels"):
        data.load_raw(spec, source="files", data_files=files)
    with pytest.raises(DataError, match="format"):
        data.load_raw(spec, source="files", data_files={"train": str(tmp_path / "x.xlsx")})
    with pytest.raises(DataError, match="not found"):
        data.load_raw(spec, source="files", data_files={"train": str(tmp_path / "nope.csv")})
    (tmp_path / "garbage.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="could not read"):
        data.load_raw(spec, source="files", data_files={"train": str(tmp_path / "garbage.parquet")})
    with pytest.raises(DataError, match="builtin"):
        data.load_raw(spec, source="builtin")


def test_hub_failure_explains_the_offline_fix(monkeypatch):
    import datasets
    import huggingface_hub

    # make sure nothing is attempted over the network, whatever the environment
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        data.load_raw(TASKS["qnli"], source="hub", path="flatray-test/does-not-exist")
    msg = str(err.value)
    assert "does-not-exist" in msg and "source='files'" in msg and "data_files" in msg
    assert "question, sentence, label" in msg


# ---------------------------------------------------------------- SQuAD

def _squad_hub_layout(path):
    with open(path, "w") as f:  # json lines, as `Dataset.to_json` writes them, with a .json name
        for qid, q, a, start in SQUAD_QA:
            f.write(json.dumps(dict(id=qid, title="Eiffel", context=CONTEXT, question=q,
                                    answers={"text": [a], "answer_start": [start]})) + "\n")
    return str(path)


def _squad_nested_layout(path):
    qas = [dict(id=qid, question=q, answers=[{"text": a, "answer_start": start}]) for qid, q, a, start in SQUAD_QA]
    with open(path, "w") as f:
        json.dump({"version": "1.1", "data": [{"title": "Eiffel", "paragraphs": [{"context": CONTEXT, "qas": qas}]}]},
                  f)
    return str(path)


@pytest.fixture(params=["hub_layout", "nested_layout"])
def squad_raw(request, tmp_path):
    write = _squad_hub_layout if request.param == "hub_layout" else _squad_nested_layout
    files = {"train": write(tmp_path / "train.json"), "validation": [write(tmp_path / "dev.json")]}
    return data.load_raw(TASKS["squad"], source="files", data_files=files)


def test_squad_layouts_load_the_same(squad_raw):
    for split in ("train", "validation"):
        ds = squad_raw[split]
        assert list(ds["id"]) == [qid for qid, *_ in SQUAD_QA]
        for ex in ds:
            text, start = ex["answers"]["text"][0], ex["answers"]["answer_start"][0]
            assert ex["context"][start:start + len(text)] == text


def test_squad_train_features_point_at_the_answer(tokenizer, squad_raw):
    tok = data.tokenize(TASKS["squad"], squad_raw, tokenizer, max_length=48, doc_stride=16)
    assert set(tok.train.column_names) == {"input_ids", "attention_mask", "token_type_ids",
                                           "start_positions", "end_positions"}
    assert len(tok.train) > 2 * len(SQUAD_QA)  # the long context is cut into several windows per question
    assert max(len(x) for x in tok.train["input_ids"]) <= 48

    # re-tokenize with offsets to decode what the positions point at
    answers = {qid: a for qid, _, a, _ in SQUAD_QA}
    enc = tokenizer([q.lstrip() for _, q, _, _ in SQUAD_QA], [CONTEXT] * len(SQUAD_QA), truncation="only_second",
                    max_length=48, stride=16, return_overflowing_tokens=True, return_offsets_mapping=True)
    assert enc["input_ids"] == tok.train["input_ids"]
    found = set()
    for i, (s, e) in enumerate(zip(tok.train["start_positions"], tok.train["end_positions"])):
        qid = SQUAD_QA[enc["overflow_to_sample_mapping"][i]][0]
        if s == e == 0:
            continue  # answer not (fully) inside this window
        offs = enc["offset_mapping"][i]
        assert enc.sequence_ids(i)[s] == enc.sequence_ids(i)[e] == 1
        assert CONTEXT[offs[s][0]:offs[e][1]] == answers[qid]
        found.add(qid)
    assert found == set(answers)  # every answer is inside at least one window


def _answer_logits(ev, gold, hit=10.0):
    """Logits that peak at the answer tokens in the windows that contain the answer, flat elsewhere."""
    n, width = len(ev.features), max(len(x) for x in ev.features["input_ids"])
    start, end = np.zeros((n, width), np.float32), np.zeros((n, width), np.float32)
    for i, (qid, offs) in enumerate(zip(ev.meta["example_id"], ev.meta["offset_mapping"])):
        a0 = CONTEXT.index(gold[qid])
        a1 = a0 + len(gold[qid])
        s = [t for t, o in enumerate(offs) if o is not None and o[0] == a0]
        e = [t for t, o in enumerate(offs) if o is not None and o[1] == a1]
        if s and e:
            start[i, s[0]], end[i, e[0]] = hit, hit
    return start, end


def test_squad_eval_postprocess_and_metrics(tokenizer, squad_raw):
    spec = TASKS["squad"]
    tok = data.tokenize(spec, squad_raw, tokenizer, max_length=48, doc_stride=16)
    ev = tok.evals["validation"]
    assert ev.labels is None and set(ev.features.column_names) == {"input_ids", "attention_mask", "token_type_ids"}
    assert len(ev.features) == len(ev.meta) > 2 * len(ev.examples)
    # offsets only on context tokens: CLS and the question are None
    first = ev.meta[0]["offset_mapping"]
    n_question = ev.features[0]["token_type_ids"].count(0)
    assert all(o is None for o in first[:n_question]) and all(o is not None for o in first[n_question:-1])

    gold = {qid: a for qid, _, a, _ in SQUAD_QA}
    start, end = _answer_logits(ev, gold)
    assert data.postprocess_qa(ev.examples, ev.meta, start, end) == gold
    assert data.compute_metrics(spec, ev, (start, end)) == {"exact_match": 100.0, "f1": 100.0}

    # per-batch outputs padded to different widths are accepted too
    lengths = [len(x) for x in ev.features["input_ids"]]
    cuts = [0, 3, 5, len(lengths)]
    parts = [(start[a:b, :max(lengths[a:b])], end[a:b, :max(lengths[a:b])]) for a, b in zip(cuts, cuts[1:])]
    per_batch = ([p[0] for p in parts], [p[1] for p in parts])
    assert data.compute_metrics(spec, ev, per_batch)["f1"] == 100.0

    # every gold answer is several tokens long, so max_answer_length=1 must pick something else
    preds = data.postprocess_qa(ev.examples, ev.meta, start, end, max_answer_length=1)
    for qid, answer in gold.items():
        assert len(tokenizer.tokenize(answer)) > 1
        assert preds[qid] != answer and len(tokenizer.tokenize(preds[qid])) <= 1


def test_squad_needs_fast_tokenizer(squad_raw):
    class Slow:
        is_fast = False

    with pytest.raises(DataError, match="fast tokenizer"):
        data.tokenize(TASKS["squad"], squad_raw, Slow(), max_length=48)


# ---------------------------------------------------------------- toy task and metrics per kind

def test_toy_dataset_is_deterministic_and_balanced():
    a, b, c = data.toy_dataset(seed=0), data.toy_dataset(seed=0), data.toy_dataset(seed=1)
    assert a["train"][:] == b["train"][:] and a["validation"][:] == b["validation"][:]
    assert a["train"]["sentence"] != c["train"]["sentence"]
    assert (len(a["train"]), len(a["validation"])) == (2000, 400)
    assert sum(a["train"]["label"]) == 1000 and sum(a["validation"]["label"]) == 200
    assert a["train"].column_names == ["sentence", "label", "idx"]
    small = data.toy_dataset(n_train=10, n_eval=4, seed=3)
    assert (len(small["train"]), len(small["validation"])) == (10, 4)
    # exactly one polarity word per sentence, and it matches the label
    for ex in a["validation"]:
        words = set(ex["sentence"].lower().split())
        pos, neg = words & set(data._POSITIVE), words & set(data._NEGATIVE)
        assert (len(pos), len(neg)) == ((1, 0) if ex["label"] == 1 else (0, 1))
    raw = data.load_raw(TASKS["toy"], source="builtin", seed=0)
    assert raw["train"][:] == a["train"][:]


def test_toy_topic_task_follows_the_subject_not_the_adjective():
    topic = data.load_raw(TASKS["toy-topic"], source="builtin", seed=0)
    first_half = data._SUBJECTS[:len(data._SUBJECTS) // 2]
    for ex in topic["validation"]:
        sentence = ex["sentence"].lower()
        assert any(s in sentence for s in first_half) == (ex["label"] == 1)
    assert sum(topic["train"]["label"]) == 1000
    positive = [bool(set(ex["sentence"].lower().split()) & set(data._POSITIVE)) for ex in topic["train"]]
    assert 0.4 < np.mean(positive) < 0.6  # the sentiment word says nothing about the topic label


def test_toy_corpus_covers_the_toy_vocabulary(tokenizer):
    corpus = data.toy_corpus()
    assert 100 <= len(corpus) <= 1000 and all(isinstance(x, str) and x for x in corpus)
    vocab = tokenizer.get_vocab()
    for word in data._POSITIVE + data._NEGATIVE:
        assert word in vocab
    sentences = list(data.toy_dataset(n_train=50, n_eval=0)["train"]["sentence"])
    assert tokenizer.unk_token_id not in sum(tokenizer(sentences)["input_ids"], [])


def _eval_set(tokenizer, task, ext="csv", tmp_path=None):
    spec = TASKS[task]
    files, _ = _glue_files(spec, tmp_path, ext)
    tok = data.tokenize(spec, data.load_raw(spec, "files", data_files=files), tokenizer, max_length=16)
    return spec, tok.evals[spec.eval_splits[0]]


@pytest.mark.parametrize("task,keys", [("sst2", {"accuracy"}), ("mrpc", {"accuracy", "f1"}), ("qqp", {"accuracy", "f1"}),
                                       ("cola", {"matthews"}), ("stsb", {"pearson", "spearman"}),
                                       ("mnli", {"accuracy"})])
def test_compute_metrics_keys(tokenizer, tmp_path, task, keys):
    spec, ev = _eval_set(tokenizer, task, tmp_path=tmp_path)
    assert spec.main_metric in keys
    if spec.kind == "regression":
        perfect = ev.labels[:, None]  # [n, 1] model outputs
        noisy = ev.labels + np.random.default_rng(0).normal(size=len(ev.labels))
        out = data.compute_metrics(spec, ev, perfect)
        assert set(out) == keys and out["pearson"] == pytest.approx(1.0) and out["spearman"] == pytest.approx(1.0)
        assert data.compute_metrics(spec, ev, noisy)["pearson"] < 1.0
    else:
        logits = np.eye(spec.num_labels, dtype=np.float32)[ev.labels] * 5.0
        out = data.compute_metrics(spec, ev, logits)
        assert set(out) == keys and all(v == pytest.approx(1.0) for v in out.values())
        out = data.compute_metrics(spec, ev, np.roll(logits, 1, axis=1))  # every prediction wrong
        if "accuracy" in out:
            assert out["accuracy"] == 0.0


def test_max_train_samples_is_a_seeded_stratified_subset(tokenizer):
    """A file sorted by label: the first 100 rows are all one class. The subset must hold both classes in their
    proportion (stratified), be drawn at random, and be the same whatever the run's seed or optimizer (tokenize
    takes neither)."""
    import datasets

    raw = data.toy_dataset(seed=0)
    ordered = raw["train"].sort("label")
    assert set(ordered.select(range(100))["label"]) == {0}
    raw = datasets.DatasetDict({"train": ordered, "validation": raw["validation"]})
    spec = TASKS["toy"]
    a = data.tokenize(spec, raw, tokenizer, 32, max_train_samples=100)
    b = data.tokenize(spec, raw, tokenizer, 32, max_train_samples=100)
    labels = a.train["labels"]
    assert len(labels) == 100 and sum(labels) == 50  # stratified: exactly the file's 50/50
    assert a.train[:] == b.train[:]  # seeded: the same subset every time
    first = data.tokenize(spec, raw, tokenizer, 32, max_train_samples=None).train.select(range(100))
    assert a.train["input_ids"] != first["input_ids"]  # not the first rows
    # regression and too-small remainders fall back to a plain seeded shuffle
    assert len(data.train_subset(ordered, 1999, spec)) == 1999
