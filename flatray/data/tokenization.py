"""Model features from raw splits: truncation (no padding), the seeded training subset, and the padding collator.

(Named tokenization, not tokenize: a submodule `tokenize` would shadow the function flatray.data.tokenize.)"""
from dataclasses import dataclass

import datasets
import numpy as np
from transformers import DataCollatorWithPadding

from flatray.data import squad
from flatray.data.errors import DataError
from flatray.data.fingerprints import fingerprinted_map
from flatray.data.tasks import TaskSpec


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

    return fingerprinted_map(ds, fn, tokenizer, f"tokenize {spec.name}",
                             fn_kwargs={"max_length": max_length, "labels": with_labels})


def tokenize(spec: TaskSpec, raw: datasets.DatasetDict, tokenizer, max_length: int, doc_stride: int = 128,
             max_train_samples: int | None = None, max_eval_samples: int | None = None) -> TokenizedData:
    """Truncate (no padding: the collator pads per batch) and build train features plus one EvalSet per split."""
    train = train_subset(raw["train"], max_train_samples, spec)
    evals = {}
    if spec.kind == "qa":
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("SQuAD needs a fast tokenizer (offset mappings); load it with use_fast=True")
        kw = dict(tokenizer=tokenizer, max_length=max_length, doc_stride=doc_stride)
        train_features = fingerprinted_map(train, squad.train_features, tokenizer, "squad train features",
                                           fn_kwargs=kw)
        for split in spec.eval_splits:
            examples = _head(raw[split], max_eval_samples)
            feats = fingerprinted_map(examples, squad.eval_features, tokenizer, f"squad {split} features",
                                      fn_kwargs=kw)
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


def collator(tokenizer):
    """collate(features) -> dict of tensors: transformers' DataCollatorWithPadding pads input_ids, attention_mask
    and token_type_ids to the batch's longest sequence (on the tokenizer's padding side); labels, start_positions
    and end_positions become tensors as they are (python floats -> float32 for regression, ints -> long)."""
    pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def collate(features: list[dict]) -> dict:
        return dict(pad(features))  # a plain dict, not the BatchEncoding the library returns

    return collate
