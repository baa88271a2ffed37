"""`datasets` objects with fingerprints named by the caller, so datasets need not hash tables, closures and tokenizers
with dill (slow, and noisy inside Ray workers)."""
import hashlib
import json

import datasets


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def in_memory(rows: dict, key: str) -> datasets.Dataset:
    """Dataset.from_dict with a fingerprint made from `key`: from_dict would hash the whole table with dill."""
    table = datasets.table.InMemoryTable.from_pydict(rows)
    return datasets.Dataset(table, fingerprint=_digest(key))


def fingerprinted_map(ds: datasets.Dataset, fn, tokenizer, desc: str, **kw) -> datasets.Dataset:
    """Batched ds.map that replaces all columns, with a fingerprint made from what determines the output: the input's
    fingerprint, `desc`, the tokenizer and the map arguments (put fn's parameters in fn_kwargs)."""
    tok = getattr(tokenizer, "backend_tokenizer", None)
    key = json.dumps([ds._fingerprint, desc, tok.to_str() if tok else repr(tokenizer), sorted(map(str, kw.items()))])
    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc=desc, new_fingerprint=_digest(key), **kw)
