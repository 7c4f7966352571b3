"""The shipped UD English EWT data and fastseq.datasets (reader, vocabulary, batches)."""
import collections
import hashlib
import io
import re

import numpy as np
import pytest

from fastseq import datasets
from fastseq.datasets import UPOS_TAGS, Vocab


def _readme_counts():
    """{split: (sentences, tokens)} from the table in the shipped README."""
    text = (datasets.EWT_DIR / "README.md").read_text(encoding="utf-8")
    counts = {}
    for m in re.finditer(r"\|\s*en_ewt-ud-(\w+)\.conllu\.gz\s*\|\s*([\d,]+)\s*\|\s*([\d,]+)\s*\|",
                         text):
        counts[m.group(1)] = (int(m.group(2).replace(",", "")),
                              int(m.group(3).replace(",", "")))
    return counts


def test_shipped_files_present_and_intact():
    d = datasets.EWT_DIR
    assert (d / "README.md").is_file()
    lic = (d / "LICENSE.txt").read_text(encoding="utf-8")
    assert "Attribution-ShareAlike 4.0" in lic
    sums = {}
    for line in (d / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        sums[name] = digest
    assert set(sums) == set(datasets.EWT_FILES.values())
    for name, digest in sums.items():
        assert hashlib.sha256((d / name).read_bytes()).hexdigest() == digest, name


def test_readme_table_parsed():
    # Guards the next test against comparing with nothing.
    assert _readme_counts() == {"train": (12544, 204577), "dev": (2001, 25147),
                                "test": (2077, 25094)}


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_ewt_counts_match_readme(split):
    sents = datasets.load_ewt(split)
    n_sent, n_tok = _readme_counts()[split]
    assert len(sents) == n_sent
    assert sum(len(w) for w, _ in sents) == n_tok
    for words, tags in sents:
        assert len(words) == len(tags) >= 1
        assert all(w and "\t" not in w for w in words)


def test_ewt_tags_are_the_17_upos():
    assert len(UPOS_TAGS) == 17 == len(set(UPOS_TAGS))
    assert list(UPOS_TAGS) == sorted(UPOS_TAGS)
    seen = collections.Counter(t for _, tags in datasets.load_ewt("train") for t in tags)
    assert set(seen) == set(UPOS_TAGS)   # every tag occurs, nothing else does
    assert seen.most_common(1)[0][0] == "NOUN"


def test_load_ewt_returns_fresh_copies():
    a = datasets.load_ewt("dev")
    a[0][0][0] = "CHANGED"
    a.pop()
    b = datasets.load_ewt("dev")
    assert b[0][0][0] != "CHANGED" and len(b) == 2001


def test_ewt_first_test_sentence():
    words, tags = datasets.load_ewt("test")[0]
    # Read straight from the gzip file, independently of the reader.
    import gzip
    with gzip.open(datasets.ewt_path("test"), "rt", encoding="utf-8") as f:
        lines = []
        for line in f:
            if not line.strip():
                break
            if not line.startswith("#"):
                lines.append(line.split("\t"))
    assert words == [c[1] for c in lines if c[0].isdigit()]
    assert tags == [c[3] for c in lines if c[0].isdigit()]


CONLLU = """\
# sent_id = a
# text = Don't go.
1-2\tDon't\t_\t_\t_\t_\t_\t_\t_\t_
1\tDo\tdo\tAUX\tVB\t_\t3\taux\t_\t_
2\tn't\tnot\tPART\tRB\t_\t3\tadvmod\t_\t_
3\tgo\tgo\tVERB\tVB\t_\t0\troot\t_\t_
3.1\tgone\tgo\tVERB\tVBN\t_\t_\t_\t3:conj\t_
4\t.\t.\tPUNCT\t.\t_\t3\tpunct\t_\t_

# sent_id = b
1\tHi\thi\tINTJ\tUH\t_\t0\troot\t_\t_
"""


def test_read_conllu_skips_comments_ranges_and_empty_nodes():
    sents = list(datasets.read_conllu(io.StringIO(CONLLU)))
    assert sents == [(["Do", "n't", "go", "."], ["AUX", "PART", "VERB", "PUNCT"]),
                     (["Hi"], ["INTJ"])]   # last sentence without a trailing blank line


def test_read_conllu_from_path_plain_and_gz(tmp_path):
    import gzip
    p = tmp_path / "x.conllu"
    p.write_text(CONLLU, encoding="utf-8")
    g = tmp_path / "x.conllu.gz"
    with gzip.open(g, "wt", encoding="utf-8") as f:
        f.write(CONLLU)
    assert list(datasets.read_conllu(p)) == list(datasets.read_conllu(g))
    assert len(list(datasets.read_conllu(str(p)))) == 2


def test_read_conllu_rejects_malformed_line():
    with pytest.raises(ValueError, match="10 tab-separated columns"):
        list(datasets.read_conllu(io.StringIO("1\tonly\tthree\n")))


def test_unknown_split():
    with pytest.raises(ValueError, match="split"):
        datasets.load_ewt("validation")


# --- vocabulary ------------------------------------------------------------------------

SENTS = [(["The", "cat", "sat"], ["DET", "NOUN", "VERB"]),
         (["the", "dog", "sat", "."], ["DET", "NOUN", "VERB", "PUNCT"]),
         (["A", "cat", "."], ["DET", "NOUN", "PUNCT"])]


def test_vocab_special_ids_and_unknown_words():
    v = Vocab.build(SENTS)
    assert v.PAD == 0 and v.UNK == 1
    assert v.itos[:2] == ["<pad>", "<unk>"]
    ids = v.encode(["cat", "zebra", "The", "the"])
    assert ids.dtype == np.int32
    assert ids[1] == Vocab.UNK           # unseen word
    assert ids[2] != ids[3]              # case kept
    assert min(v.stoi.values()) == 2     # no real word gets 0 or 1
    assert v.decode(v.encode(["cat", "sat"])) == ["cat", "sat"]
    assert "cat" in v and "zebra" not in v
    assert v["zebra"] == 1 and v["cat"] == ids[0]


def test_vocab_lowercase_and_min_count():
    v = Vocab.build(SENTS, lowercase=True, min_count=2)
    # counts (lowercased): the 2, cat 2, sat 2, . 2, dog 1, a 1
    assert sorted(v.itos[2:]) == sorted(["the", "cat", "sat", "."])
    assert v.encode(["THE"])[0] == v.encode(["the"])[0] != Vocab.UNK
    assert v.encode(["dog"])[0] == Vocab.UNK
    assert len(v) == 6
    # most frequent first, ties by first occurrence
    assert v.itos[2:] == ["the", "cat", "sat", "."]
    with pytest.raises(ValueError, match="min_count"):
        Vocab.build(SENTS, min_count=0)


def test_vocab_from_ewt_train_and_roundtrip(tmp_path):
    train = datasets.load_ewt("train")
    full = Vocab.build(train)
    n_types = len({w for ws, _ in train for w in ws})
    assert len(full) == n_types + 2
    dv = datasets.default_vocab()
    assert dv.lowercase and len(dv) < len(full)
    # words of the test set missing from train map to UNK, and only those
    test_words = [w for ws, _ in datasets.load_ewt("test") for w in ws]
    ids = full.encode(test_words)
    train_words = {w for ws, _ in train for w in ws}
    assert np.array_equal(ids == Vocab.UNK, np.array([w not in train_words for w in test_words]))
    assert 0 < np.mean(ids == Vocab.UNK) < 0.2
    path = tmp_path / "vocab.txt"
    dv.save(path)
    back = Vocab.load(path, lowercase=True)
    assert back.itos == dv.itos
    assert np.array_equal(back.encode(test_words[:500]), dv.encode(test_words[:500]))


# --- batches ---------------------------------------------------------------------------


def _check_batches(bs, sents, vocab, batch_size):
    seen = []
    for b in bs:
        B, T = b.ids.shape
        assert b.ids.dtype == np.int32 and b.tags.dtype == np.int32 and b.mask.dtype == bool
        assert b.tags.shape == b.mask.shape == (B, T)
        assert 1 <= B <= batch_size
        assert T == max(1, int(b.lengths.max()))
        # mask is a right-aligned prefix of each row's length
        assert np.array_equal(b.mask, np.arange(T)[None, :] < b.lengths[:, None])
        assert np.all(b.ids[~b.mask] == 0) and np.all(b.tags[~b.mask] == 0)
        assert np.all(b.ids[b.mask] > 0)
        for r, s in enumerate(b.index):
            words, tags = sents[s]
            n = len(words)
            assert b.lengths[r] == n
            assert np.array_equal(b.ids[r, :n], vocab.encode(words))
            assert [UPOS_TAGS[t] for t in b.tags[r, :n]] == tags
        seen.extend(b.index.tolist())
    assert sorted(seen) == list(range(len(sents)))   # every sentence exactly once
    return seen


def test_batches_sorted_padding_and_mask():
    sents = datasets.load_ewt("dev")
    vocab = Vocab.build(datasets.load_ewt("train"), lowercase=True)
    bs = list(datasets.batches(sents, vocab, batch_size=32))
    assert len(bs) == -(-len(sents) // 32)
    _check_batches(bs, sents, vocab, 32)
    lens = np.concatenate([b.lengths for b in bs])
    assert np.all(np.diff(lens) >= 0)     # length-sorted: minimal padding
    padded = sum(b.ids.size for b in bs)
    assert padded < 1.1 * sum(len(w) for w, _ in sents)


def test_batches_shuffle_deterministic_with_seed():
    sents = datasets.load_ewt("test")
    vocab = datasets.default_vocab()
    a = list(datasets.batches(sents, vocab, batch_size=16, shuffle=True, seed=3))
    b = list(datasets.batches(sents, vocab, batch_size=16, shuffle=True, seed=3))
    c = list(datasets.batches(sents, vocab, batch_size=16, shuffle=True, seed=4))
    _check_batches(a, sents, vocab, 16)
    assert len(a) == len(b)
    assert all(np.array_equal(x.ids, y.ids) and np.array_equal(x.index, y.index)
               for x, y in zip(a, b))
    assert [x.index.tolist() for x in a] != [x.index.tolist() for x in c]
    # still bucketed: padding well below a random batching's
    assert sum(x.ids.size for x in a) < 1.3 * sum(len(w) for w, _ in sents)


def test_batches_unknown_words_and_max_len():
    vocab = Vocab.build(SENTS)
    sents = [(["cat", "qwerty", "sat"], ["NOUN", "X", "VERB"]), (["zzz"], ["X"])]
    (b,) = list(datasets.batches(sents, vocab, batch_size=8))
    assert b.index.tolist() == [1, 0]      # shorter first
    assert b.ids.tolist() == [[1, 0, 0], [vocab["cat"], 1, vocab["sat"]]]
    assert b.tags[1].tolist() == [UPOS_TAGS.index("NOUN"), UPOS_TAGS.index("X"),
                                  UPOS_TAGS.index("VERB")]
    (t,) = list(datasets.batches(sents, vocab, batch_size=8, max_len=2))
    assert t.ids.shape == (2, 2) and t.lengths.tolist() == [1, 2]


def test_batches_bad_arguments():
    vocab = Vocab.build(SENTS)
    with pytest.raises(ValueError, match="batch_size"):
        list(datasets.batches(SENTS, vocab, batch_size=0))
    with pytest.raises(ValueError, match="3 words but 2 tags"):
        list(datasets.batches([(["a", "b", "c"], ["X", "X"])], vocab))
    with pytest.raises(ValueError, match="unknown UPOS tag"):
        list(datasets.batches([(["a"], ["NN"])], vocab))
