"""Part-of-speech tagging data: the UD English EWT treebank shipped with the package.

The treebank (CoNLL-U, gzip-compressed) lives in ``fastseq/data/ud-english-ewt/`` next to
its README and license (CC BY-SA 4.0).  This module reads it and turns it into padded,
length-bucketed integer batches for a tagger::

    from fastseq import datasets
    train = datasets.load_ewt("train")          # list of (words, upos) sentence pairs
    vocab = datasets.Vocab.build(train, lowercase=True, min_count=2)
    for batch in datasets.batches(datasets.load_ewt("test"), vocab, batch_size=32):
        batch.ids    # int32 [B, T], 0 = padding
        batch.tags   # int32 [B, T], index into UPOS_TAGS (0 at padding)
        batch.mask   # bool  [B, T], True on real tokens
        batch.index  # int64 [B], position of each row's sentence in the input list

Only the standard library and NumPy are used here.
"""
from __future__ import annotations

import collections
import functools
import gzip
import io
import os
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np

__all__ = [
    "UPOS_TAGS", "TAG_INDEX", "EWT_DIR", "EWT_FILES", "read_conllu", "load_ewt",
    "ewt_path", "Vocab", "Batch", "batches", "encode_tags", "default_vocab",
]

# The 17 Universal POS tags (UD v2), in a fixed (alphabetical) order: a tagger's output
# unit k stands for UPOS_TAGS[k].
UPOS_TAGS = (
    "ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON",
    "PROPN", "PUNCT", "SCONJ", "SYM", "VERB", "X",
)
TAG_INDEX = {tag: i for i, tag in enumerate(UPOS_TAGS)}

EWT_DIR = Path(__file__).resolve().parent / "data" / "ud-english-ewt"
EWT_FILES = {
    "train": "en_ewt-ud-train.conllu.gz",
    "dev": "en_ewt-ud-dev.conllu.gz",
    "test": "en_ewt-ud-test.conllu.gz",
}


def ewt_path(split: str) -> Path:
    """Path of the shipped EWT file for ``split`` ("train", "dev" or "test")."""
    if split not in EWT_FILES:
        raise ValueError(
            f"split must be one of {sorted(EWT_FILES)}; got {split!r}")
    return EWT_DIR / EWT_FILES[split]


def _is_token_id(token_id: str) -> bool:
    # Word lines have an integer ID; multiword-token ranges ("3-4") and empty nodes
    # ("8.1") are not tokens for tagging.
    return token_id.isdigit()


def read_conllu(source) -> Iterator[tuple[list[str], list[str]]]:
    """Yield the sentences of a CoNLL-U file as ``(words, upos)`` pairs of equal length.

    ``source`` is a path (``.gz`` files are decompressed) or an open text file / iterable of
    lines.  Comment lines (``#``), multiword-token range lines (ID ``3-4``) and empty nodes
    (ID ``8.1``) are skipped; a blank line ends a sentence.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                yield from read_conllu(f)
        except (UnicodeDecodeError, OSError, EOFError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise ValueError(f"{path}: cannot read it as UTF-8 CoNLL-U "
                             f"({type(exc).__name__}: {exc})") from None
        return
    if isinstance(source, (bytes, bytearray)):
        source = io.StringIO(source.decode("utf-8"))
    words: list[str] = []
    tags: list[str] = []
    for lineno, raw in enumerate(source, 1):
        line = raw.rstrip("\r\n")
        if lineno == 1:
            # a byte-order mark (from any source) is not part of the first line's ID
            line = line.lstrip("\ufeff")
        if not line.strip():
            if words:
                yield words, tags
                words, tags = [], []
            continue
        if line.startswith("#"):
            continue
        cols = line.split("\t")
        if len(cols) != 10:
            raise ValueError(
                f"CoNLL-U line {lineno}: expected 10 tab-separated columns, got {len(cols)}: "
                f"{line[:80]!r}")
        if not _is_token_id(cols[0]):
            continue
        words.append(cols[1])
        tags.append(cols[3])
    if words:
        yield words, tags


@functools.lru_cache(maxsize=None)
def _load_ewt_cached(split: str) -> tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]:
    return tuple((tuple(w), tuple(t)) for w, t in read_conllu(ewt_path(split)))


def load_ewt(split: str) -> list[tuple[list[str], list[str]]]:
    """Sentences of the UD English EWT ``split`` ("train", "dev", "test") as
    ``(words, upos)`` list pairs, in file order.  Parsed once per process (cached); the
    returned lists are fresh copies, safe to modify."""
    return [(list(w), list(t)) for w, t in _load_ewt_cached(split)]


def encode_tags(tags: Iterable[str]) -> np.ndarray:
    """UPOS tag strings -> int32 indices into :data:`UPOS_TAGS`."""
    out = []
    for tag in tags:
        try:
            out.append(TAG_INDEX[tag])
        except KeyError:
            raise ValueError(f"unknown UPOS tag {tag!r}; expected one of {UPOS_TAGS}") from None
    return np.asarray(out, dtype=np.int32)


class Vocab:
    """Word -> integer id mapping.  Id 0 is padding, id 1 the unknown word; known words get
    ids from 2 in order of decreasing frequency (ties: first occurrence)."""

    PAD = 0
    UNK = 1
    PAD_TOKEN = "<pad>"
    UNK_TOKEN = "<unk>"

    def __init__(self, words: Iterable[str] = (), *, lowercase: bool = False):
        self.lowercase = bool(lowercase)
        self.itos: list[str] = [self.PAD_TOKEN, self.UNK_TOKEN]
        self.stoi: dict[str, int] = {}
        for w in words:
            w = self.normalize(w)
            if w not in self.stoi:
                self.stoi[w] = len(self.itos)
                self.itos.append(w)

    @classmethod
    def build(cls, sentences, *, lowercase: bool = False, min_count: int = 1) -> "Vocab":
        """Vocabulary of the words occurring at least ``min_count`` times in ``sentences``
        (an iterable of ``(words, tags)`` pairs or of word lists)."""
        if int(min_count) < 1:
            raise ValueError(f"min_count must be >= 1; got {min_count!r}")
        counts: collections.Counter = collections.Counter()
        for sent in sentences:
            # a (words, tags) pair - a list pair too, as JSON gives it - or a word list
            pair = isinstance(sent, (tuple, list)) and len(sent) == 2 and \
                isinstance(sent[0], (list, tuple))
            words = sent[0] if pair else sent
            if isinstance(words, str) or not all(isinstance(w, str) for w in words):
                raise TypeError(f"Vocab.build: `sentences` must hold (words, tags) pairs "
                                f"or lists of words (strings), got {sent!r:.80}")
            counts.update(w.lower() if lowercase else w for w in words)
        # Counter.most_common orders equal counts by first insertion: deterministic.
        kept = [w for w, c in counts.most_common() if c >= min_count]
        return cls(kept, lowercase=lowercase)

    def normalize(self, word: str) -> str:
        return word.lower() if self.lowercase else word

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return self.normalize(word) in self.stoi

    def __getitem__(self, word: str) -> int:
        return self.stoi.get(self.normalize(word), self.UNK)

    def encode(self, words: Iterable[str]) -> np.ndarray:
        """Words -> int32 ids (unknown words -> :attr:`UNK`)."""
        get, unk, norm = self.stoi.get, self.UNK, self.normalize
        return np.asarray([get(norm(w), unk) for w in words], dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.itos):
                raise ValueError(f"decode: id {i} is outside the vocabulary [0, "
                                 f"{len(self.itos)})")
            out.append(self.itos[i])
        return out

    def save(self, path) -> None:
        """Write one word per line in id order (ids 0 and 1 included)."""
        bad = [w for w in self.itos if "\n" in w or "\r" in w]
        if bad:
            raise ValueError(f"save: words with line breaks cannot be saved one per line: "
                             f"{bad[:3]!r}")
        Path(path).write_text("\n".join(self.itos) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path, *, lowercase: bool = False) -> "Vocab":
        lines = Path(path).read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if lines[:2] != [cls.PAD_TOKEN, cls.UNK_TOKEN]:
            raise ValueError(f"{path}: not a fastseq vocabulary file (first lines must be "
                             f"{cls.PAD_TOKEN!r}, {cls.UNK_TOKEN!r})")
        return cls(lines[2:], lowercase=lowercase)

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, lowercase={self.lowercase})"


def default_vocab() -> Vocab:
    """The vocabulary the benchmark's EWT tagger uses: EWT train, lowercased, words seen at
    least twice."""
    return Vocab.build(_load_ewt_cached("train"), lowercase=True, min_count=2)


class Batch(NamedTuple):
    ids: np.ndarray    # int32 [B, T], 0 = padding
    tags: np.ndarray   # int32 [B, T], 0 at padding (check ``mask``)
    mask: np.ndarray   # bool  [B, T], True on real tokens (a right-aligned prefix per row)
    index: np.ndarray  # int64 [B], row -> position of its sentence in the input
    lengths: np.ndarray  # int32 [B]


def batches(sentences, vocab: Vocab, batch_size: int = 32, *, shuffle: bool = False,
            seed: int = 0, pool_batches: int = 50, max_len: int | None = None
            ) -> Iterator[Batch]:
    """Length-bucketed, right-padded batches of ``sentences`` (``(words, tags)`` pairs).

    Without ``shuffle``: all sentences sorted by length (ties in input order), cut into
    batches of ``batch_size`` - shortest batches first; the minimum padding.
    With ``shuffle``: the sentences are permuted with ``numpy.random.default_rng(seed)``,
    sorted by length within pools of ``pool_batches * batch_size`` and the batch order is
    shuffled; the same seed gives the same batches.
    ``max_len`` truncates longer sentences.  Each batch is padded to its longest sentence
    (at least 1 step).
    """
    for name, value in (("batch_size", batch_size), ("max_len", max_len),
                        ("pool_batches", pool_batches)):
        if value is None and name == "max_len":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or \
                value < 1:
            raise ValueError(f"batches: `{name}` must be an int >= 1"
                             + (" or None" if name == "max_len" else "")
                             + f", got {value!r}")
    encoded = []
    for words, tags in sentences:
        if len(words) != len(tags):
            raise ValueError(f"sentence has {len(words)} words but {len(tags)} tags")
        ids, tg = vocab.encode(words), encode_tags(tags)
        if max_len is not None:
            ids, tg = ids[:max_len], tg[:max_len]
        encoded.append((ids, tg))
    n = len(encoded)
    lengths = np.asarray([len(e[0]) for e in encoded], dtype=np.int64)
    if not shuffle:
        order = np.argsort(lengths, kind="stable")
        groups = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    else:
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        pool = pool_batches * batch_size
        groups = []
        for p in range(0, n, pool):
            chunk = perm[p:p + pool]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            groups.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
        groups = [groups[i] for i in rng.permutation(len(groups))]
    for rows in groups:
        lens = lengths[rows]
        t = max(1, int(lens.max()))
        b = len(rows)
        ids = np.zeros((b, t), dtype=np.int32)
        tg = np.zeros((b, t), dtype=np.int32)
        for r, s in enumerate(rows):
            k = lens[r]
            ids[r, :k] = encoded[s][0]
            tg[r, :k] = encoded[s][1]
        mask = np.arange(t)[None, :] < lens[:, None]
        yield Batch(ids, tg, mask, np.asarray(rows, dtype=np.int64), lens.astype(np.int32))
