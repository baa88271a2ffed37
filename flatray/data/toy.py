"""The built-in toy tasks (toy, toy-topic): generated sentences in the SST-2 layout, offline and deterministic."""
import datasets
import numpy as np

from flatray.data.fingerprints import in_memory
from flatray.toy_text import toy_sentences


def toy_dataset(n_train: int = 2000, n_eval: int = 400, seed: int = 0, task: str = "toy") -> datasets.DatasetDict:
    """Built-in tasks in the SST-2 layout. toy: one adjective from a fixed list decides the label (sentiment-like);
    toy-topic: the subject does (same vocabulary, another rule)."""
    rng = np.random.default_rng(seed)  # own generator: same seed -> same data, whatever else ran before
    splits = {}
    for split, n in (("train", n_train), ("validation", n_eval)):
        labels = rng.permutation(np.arange(n) % 2)  # exactly balanced (up to one for odd n)
        rows = {"sentence": toy_sentences(rng, labels, topic=task == "toy-topic"), "label": labels.tolist(),
                "idx": list(range(n))}
        splits[split] = in_memory(rows, key=f"{task}-v1-{split}-{n_train}-{n_eval}-{seed}")
    return datasets.DatasetDict(splits)
