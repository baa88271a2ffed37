"""SQuAD v1.1: question/context windows as model features, and the best answer span back from start/end logits.
(Its official EM/F1 scoring is in flatray.data.metrics.)"""
import numpy as np


def _windows(batch, tokenizer, max_length, doc_stride):
    # question first, context second; only the context is truncated, in overlapping windows
    return tokenizer([q.lstrip() for q in batch["question"]], batch["context"], truncation="only_second",
                     max_length=max_length, stride=doc_stride, return_overflowing_tokens=True,
                     return_offsets_mapping=True)


def train_features(batch, tokenizer, max_length, doc_stride):
    """A batched map function: windows with start/end token positions of the first answer (CLS when outside)."""
    enc = _windows(batch, tokenizer, max_length, doc_stride)
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


def eval_features(batch, tokenizer, max_length, doc_stride):
    """A batched map function: windows with their example_id and offset_mapping (None off the context)."""
    enc = _windows(batch, tokenizer, max_length, doc_stride)
    sample = enc.pop("overflow_to_sample_mapping")
    enc["example_id"] = [batch["id"][j] for j in sample]
    # keep offsets only for context tokens so post-processing can tell what a span may cover
    enc["offset_mapping"] = [[o if s == 1 else None for o, s in zip(offs, enc.sequence_ids(i))]
                             for i, offs in enumerate(enc["offset_mapping"])]
    return enc


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
