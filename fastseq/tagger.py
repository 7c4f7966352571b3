"""``fastseq train-tagger``: train the UD English EWT part-of-speech tagger with fastseq.

The model is the benchmark's tagger::

    Embedding(V, 100, mask_zero=True) -> Bidirectional(LSTM(128, return_sequences=True))
        -> Dense(17, softmax) over every step (= TimeDistributed(Dense))

initialised as Keras initialises it (uniform(-0.05, 0.05) embeddings, glorot_uniform
kernels, orthogonal recurrent kernels, unit forget bias), trained with Adam on
length-bucketed batches of EWT train; it reports dev and test UPOS accuracy and the time
per epoch, and saves the model as ``PATH.npz`` + ``PATH.json`` (vocabulary included; no
pickle).  ``--compare keras`` / ``--compare torch`` train the same model from the same
initial weights on the same batches with Keras (``train_on_batch``, TensorFlow) / PyTorch
in the same run (each in a child process of its own, so that the frameworks' thread
pools do not compete).  ``--load PATH --tag "The dog barks ."`` tags a sentence.

The Keras model of ``--compare keras`` applies its Dense layer to the 3-D sequence
directly instead of through TimeDistributed (the same computation): Keras 3's
TimeDistributed after a masking Embedding fails in ``train_on_batch`` on batches of
varying length.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

E_DEFAULT, H_DEFAULT = 100, 128


# --- the model ------------------------------------------------------------------------
def _glorot(rng, shape):
    limit = np.sqrt(6.0 / (shape[0] + shape[1]))
    return rng.uniform(-limit, limit, size=shape)


def _orthogonal(rng, shape):
    """Keras's Orthogonal initializer (gain 1) for a 2-D shape."""
    rows, cols = shape
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q = q * np.sign(np.diag(r))
    return q.T if rows < cols else q


def init_weights(V, E=E_DEFAULT, H=H_DEFAULT, K=17, seed=0, dtype=np.float32):
    """Initial weights of the tagger in Keras's ``trainable_weights`` order: embeddings,
    forward LSTM kernel/recurrent_kernel/bias, backward LSTM ..., Dense kernel/bias."""
    rng = np.random.default_rng(seed)
    out = [rng.uniform(-0.05, 0.05, size=(V, E))]
    for _ in range(2):
        bias = np.zeros(4 * H)
        bias[H:2 * H] = 1.0  # unit_forget_bias
        out += [_glorot(rng, (E, 4 * H)), _orthogonal(rng, (H, 4 * H)), bias]
    out += [_glorot(rng, (2 * H, K)), np.zeros(K)]
    return [np.ascontiguousarray(w, dtype=dtype) for w in out]


def build_model(V, E=E_DEFAULT, H=H_DEFAULT, K=17, weights=None, seed=0,
                dtype=np.float32):
    """The tagger as a fastseq Model (weights: ``init_weights`` order; default: a fresh
    Keras-style initialisation)."""
    from . import keras_import as ki
    w = init_weights(V, E, H, K, seed, dtype) if weights is None else \
        [np.array(a, dtype=dtype) for a in weights]

    def lstm(name, k, r, b, backwards):
        # Keras's Bidirectional sets zero_output_for_mask = return_sequences
        return ki.LSTM(name, "LSTM", dtype, k, r, b, return_sequences=True,
                       go_backwards=backwards, zero_output_for_mask=True,
                       activation="tanh", recurrent_activation="sigmoid")

    layers = [
        ki.Embedding("embedding", "Embedding", dtype, w[0], True),
        ki.Bidirectional("bidirectional", "Bidirectional(LSTM)", dtype,
                         lstm("forward_lstm", *w[1:4], False),
                         lstm("backward_lstm", *w[4:7], True), "concat"),
        ki.Dense("dense", "Dense", dtype, w[7], w[8], "softmax"),
    ]
    return ki.Model(layers, (None, None), name="ewt_tagger")


def build_keras_model(V, E=E_DEFAULT, H=H_DEFAULT, K=17, weights=None):
    """The same tagger in Keras (Dense on the 3-D sequence)."""
    import keras
    model = keras.Sequential([
        keras.Input((None,), dtype="int32"),
        keras.layers.Embedding(V, E, mask_zero=True),
        keras.layers.Bidirectional(keras.layers.LSTM(H, return_sequences=True)),
        keras.layers.Dense(K, activation="softmax"),
    ], name="ewt_tagger")
    if weights is not None:
        model.set_weights([np.asarray(w, np.float32) for w in weights])
    return model


# --- evaluation -----------------------------------------------------------------------
def accuracy(predict, batches):
    """Token accuracy of ``predict(ids) -> probs [B, T, K]`` over the batches' masks."""
    correct = total = 0
    for b in batches:
        pred = np.argmax(predict(b.ids), axis=-1)
        correct += int(np.sum((pred == b.tags) & b.mask))
        total += int(b.mask.sum())
    return correct / max(total, 1)


def tag_sentence(model, vocab, sentence):
    """[(word, UPOS tag)] for a whitespace-tokenised sentence."""
    from .datasets import UPOS_TAGS
    words = sentence.split()
    if not words:
        return []
    ids = vocab.encode(words)[None, :]
    pred = np.argmax(model.predict(ids), axis=-1)[0]
    return [(w, UPOS_TAGS[int(k)]) for w, k in zip(words, pred)]


def save_tagger(model, vocab, path, info=None):
    from . import training
    from .datasets import UPOS_TAGS
    meta = {"task": "ud-ewt-upos-tagger", "vocab": vocab.itos, "lowercase": vocab.lowercase,
            "tags": list(UPOS_TAGS), "info": info or {}}
    return training.save(model, path, metadata=meta)


def load_tagger(path):
    """(model, vocab) saved by ``save_tagger``."""
    from . import training
    from .datasets import Vocab
    model = training.load(path)
    meta = model.metadata
    words = meta.get("vocab")
    if meta.get("task") != "ud-ewt-upos-tagger" or not isinstance(words, list) or \
            not all(isinstance(w, str) for w in words) or \
            not isinstance(meta.get("lowercase"), bool):
        raise ValueError(f"{path}: not a fastseq tagger (its metadata needs the task, the "
                         f"vocabulary as a list of words and the lowercase flag)")
    vocab = Vocab(words[2:], lowercase=meta["lowercase"])
    V = model.layers[0].embeddings.shape[0] if hasattr(model.layers[0], "embeddings") \
        else None
    if V != len(vocab):
        raise ValueError(f"{path}: the vocabulary has {len(vocab)} words but the "
                         f"model's Embedding {V} rows")
    return model, vocab


# --- the runs -------------------------------------------------------------------------
def _epoch_batches(train, vocab, batch_size, seed, epoch):
    from . import datasets
    return list(datasets.batches(train, vocab, batch_size, shuffle=True,
                                 seed=seed * 1000 + epoch))


def _log(msg):
    print(msg, flush=True)


def run_fastseq(train, dev, test, vocab, weights, args, sizes):
    from . import training
    V = len(vocab)
    model = build_model(V, *sizes, weights=weights)
    training.compile(model, optimizer={"class_name": "adam",
                                       "config": {"learning_rate": args.lr}})
    res = {"framework": "fastseq", "epoch_time": [], "dev_accuracy": [], "loss": []}
    for epoch in range(args.epochs):
        bs = [(b.ids, b.tags) for b in _epoch_batches(train, vocab, args.batch_size,
                                                       args.seed, epoch)]
        hist = training.fit(model, bs, epochs=1, shuffle=False,
                            verbose=0 if args.no_progress else 1)
        _end_epoch(res, epoch, args, hist["epoch_time"][0], hist["loss"][0],
                   accuracy(model.predict, dev))
    res["test_accuracy"] = accuracy(model.predict, test)
    return model, res


def run_keras(train, dev, test, vocab, weights, args, sizes):
    import keras
    model = build_keras_model(len(vocab), *sizes, weights=weights)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=args.lr),
                  loss="sparse_categorical_crossentropy")
    res = {"framework": "keras", "epoch_time": [], "dev_accuracy": [], "loss": []}
    predict = lambda ids: np.asarray(model.predict_on_batch(ids))  # noqa: E731
    for epoch in range(args.epochs):
        bs = _epoch_batches(train, vocab, args.batch_size, args.seed, epoch)
        t0 = time.perf_counter()
        total = n = 0.0
        for b in _progress(bs, f"keras epoch {epoch + 1}", args.no_progress):
            total += float(model.train_on_batch(b.ids, b.tags)) * len(b.ids)
            n += len(b.ids)
        _end_epoch(res, epoch, args, time.perf_counter() - t0, total / n,
                   accuracy(predict, dev))
    res["test_accuracy"] = accuracy(predict, test)
    return res


def torch_tagger(V, sizes, weights, lr):
    """The same tagger in PyTorch (nn.Embedding, bidirectional nn.LSTM over packed
    sequences, Linear), initialised with the Keras-order ``weights``; returns the module,
    an Adam optimizer with Keras's defaults and a summed cross-entropy."""
    import torch
    from torch import nn
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    E, H, K = sizes
    emb, fk, fr, fb, bk, br, bb, dk, db = [np.asarray(w, np.float32) for w in weights]

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, E)
            self.lstm = nn.LSTM(E, H, batch_first=True, bidirectional=True)
            self.dense = nn.Linear(2 * H, K)

        def forward(self, ids, lengths):
            packed = pack_padded_sequence(self.emb(ids), lengths, batch_first=True,
                                          enforce_sorted=False)
            y, _ = self.lstm(packed)
            y, _ = pad_packed_sequence(y, batch_first=True, total_length=ids.shape[1])
            return self.dense(y)

    mod = Tagger()
    with torch.no_grad():
        mod.emb.weight.copy_(torch.from_numpy(emb))
        for sfx, (k, r, b) in (("", (fk, fr, fb)), ("_reverse", (bk, br, bb))):
            getattr(mod.lstm, "weight_ih_l0" + sfx).copy_(torch.from_numpy(k.T.copy()))
            getattr(mod.lstm, "weight_hh_l0" + sfx).copy_(torch.from_numpy(r.T.copy()))
            getattr(mod.lstm, "bias_ih_l0" + sfx).copy_(torch.from_numpy(b))
            getattr(mod.lstm, "bias_hh_l0" + sfx).zero_()
        mod.dense.weight.copy_(torch.from_numpy(dk.T.copy()))
        mod.dense.bias.copy_(torch.from_numpy(db))
    opt = torch.optim.Adam(mod.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-7)
    return mod, opt, nn.CrossEntropyLoss(reduction="sum")


def run_torch(train, dev, test, vocab, weights, args, sizes):
    import torch
    mod, opt, lossf = torch_tagger(len(vocab), sizes, weights, args.lr)

    def lengths_of(ids):
        return torch.from_numpy(np.maximum((ids != 0).sum(axis=1), 1).astype(np.int64))

    def predict(ids):
        mod.eval()
        with torch.inference_mode():
            logits = mod(torch.from_numpy(ids.astype(np.int64)), lengths_of(ids))
        mod.train()
        return logits.numpy()

    res = {"framework": "torch", "epoch_time": [], "dev_accuracy": [], "loss": []}
    for epoch in range(args.epochs):
        bs = _epoch_batches(train, vocab, args.batch_size, args.seed, epoch)
        t0 = time.perf_counter()
        total = n = 0.0
        for b in _progress(bs, f"torch epoch {epoch + 1}", args.no_progress):
            m = torch.from_numpy(b.mask)
            logits = mod(torch.from_numpy(b.ids.astype(np.int64)),
                         torch.from_numpy(b.lengths.astype(np.int64)))
            loss = lossf(logits[m], torch.from_numpy(b.tags.astype(np.int64))[m]) / m.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b.ids)
            n += len(b.ids)
        _end_epoch(res, epoch, args, time.perf_counter() - t0, total / n,
                   accuracy(predict, dev))
    res["test_accuracy"] = accuracy(predict, test)
    return res


def _end_epoch(res, epoch, args, seconds, loss, dev_accuracy):
    """Record one epoch of a framework's run in ``res`` and log it."""
    res["epoch_time"].append(seconds)
    res["loss"].append(loss)
    res["dev_accuracy"].append(dev_accuracy)
    _log(f"{res['framework']:7s} epoch {epoch + 1}/{args.epochs}: loss {loss:.4f}  "
         f"dev acc {dev_accuracy:.4f}  {seconds:.1f} s")


def _progress(items, desc, disabled):
    if disabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="batch")


# --- command line ---------------------------------------------------------------------
def build_parser(parser=None):
    from ._validate import positive_int, positive_float, writable_path
    p = parser or argparse.ArgumentParser(
        prog="fastseq train-tagger",
        description="Train the UD English EWT UPOS tagger (Embedding -> BiLSTM -> Dense "
                    "softmax) with fastseq; report dev/test accuracy and time per epoch.")
    p.add_argument("--epochs", type=positive_int, default=5,
                   help="training epochs (default 5)")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="batch size (default 32)")
    p.add_argument("--max-sentences", type=positive_int, default=None,
                   help="train on the first N sentences of EWT train (quick runs); dev and "
                        "test are cut to N as well")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument("--embedding-dim", type=positive_int, default=E_DEFAULT)
    p.add_argument("--units", type=positive_int, default=H_DEFAULT,
                   help="LSTM units per direction")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights and the batch shuffling")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="threads for fastseq (and the compared frameworks)")
    p.add_argument("--compare", default="",
                   help="comma-separated frameworks to train side by side: keras, torch")
    p.add_argument("--save", type=writable_path, default="fastseq_tagger", metavar="PATH",
                   help="write the trained model to PATH.npz + PATH.json (default "
                        "%(default)s)")
    p.add_argument("--no-save", action="store_true", help="do not save the model")
    p.add_argument("--load", default=None, metavar="PATH",
                   help="load a saved tagger instead of training")
    p.add_argument("--tag", default=None, metavar="SENTENCE",
                   help="tag a whitespace-tokenised sentence with the trained/loaded model")
    p.add_argument("--json", type=writable_path, default=None, metavar="PATH",
                   help="write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # internal: train one compared framework in a child process, results to --json
    p.add_argument("--worker", default=None, choices=("keras", "torch"),
                   help=argparse.SUPPRESS)
    return p


def _compare_in_subprocess(fw, args):
    """Train framework ``fw`` in a child process (each framework in a process of its
    own: TensorFlow's and PyTorch's thread pools slow each other down when they share
    one) and return its results."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "fastseq.tagger", "--worker", fw,
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--lr", repr(args.lr), "--embedding-dim", str(args.embedding_dim),
               "--units", str(args.units), "--seed", str(args.seed), "--json", out]
        if args.max_sentences is not None:
            cmd += ["--max-sentences", str(args.max_sentences)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.no_progress:
            cmd.append("--no-progress")
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        if fw == "keras":
            env.setdefault("KERAS_BACKEND", "tensorflow")
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(f"--compare {fw}: the {fw} run failed (exit status "
                               f"{proc.returncode})")
        with open(out) as f:
            return json.load(f)


def _worker(args):
    """Child process of --compare: train one framework, write its results."""
    from . import datasets
    if args.threads:
        if args.worker == "torch":
            import torch
            torch.set_num_threads(args.threads)
        else:
            import tensorflow as tf
            tf.config.threading.set_intra_op_parallelism_threads(args.threads)
            tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    n = args.max_sentences
    train = datasets.load_ewt("train")[:n]
    vocab = datasets.default_vocab()
    dev = list(datasets.batches(datasets.load_ewt("dev")[:n], vocab, args.batch_size))
    test = list(datasets.batches(datasets.load_ewt("test")[:n], vocab, args.batch_size))
    sizes = (args.embedding_dim, args.units, len(datasets.UPOS_TAGS))
    weights = init_weights(len(vocab), *sizes, seed=args.seed)
    runner = run_keras if args.worker == "keras" else run_torch
    res = runner(train, dev, test, vocab, weights, args, sizes)
    with open(args.json, "w") as f:
        json.dump(res, f, default=float)
    return 0


def _print_tags(pairs):
    _log(" ".join(f"{w}/{t}" for w, t in pairs))


def run(args):
    from . import datasets
    if args.worker:
        return _worker(args)
    if args.threads:
        from . import set_num_threads
        set_num_threads(args.threads)
    if args.load is not None:
        if not args.load:
            raise ValueError("--load: the path is empty")
        if args.compare:
            raise ValueError("--compare trains frameworks side by side; it cannot be used "
                             "with --load")
        model, vocab = load_tagger(args.load)
        if args.tag is not None:
            _print_tags(tag_sentence(model, vocab, args.tag))
            return 0
        n = args.max_sentences
        report = {}
        for split in ("dev", "test"):
            data = datasets.load_ewt(split)[:n]
            bs = list(datasets.batches(data, vocab, args.batch_size))
            report[f"{split}_accuracy"] = accuracy(model.predict, bs)
            _log(f"{split} UPOS accuracy: {report[split + '_accuracy']:.4f}")
        return 0
    if args.epochs < 1 or args.batch_size < 1:
        raise ValueError("--epochs and --batch-size must be >= 1")
    compare = [c.strip() for c in args.compare.split(",") if c.strip()]
    unknown = set(compare) - {"keras", "torch"}
    if unknown:
        raise ValueError(f"--compare: unknown framework(s) {sorted(unknown)}; choose from "
                         f"keras, torch")
    n = args.max_sentences
    train = datasets.load_ewt("train")[:n]
    dev_s, test_s = datasets.load_ewt("dev")[:n], datasets.load_ewt("test")[:n]
    vocab = datasets.default_vocab()
    dev = list(datasets.batches(dev_s, vocab, args.batch_size))
    test = list(datasets.batches(test_s, vocab, args.batch_size))
    sizes = (args.embedding_dim, args.units, len(datasets.UPOS_TAGS))
    weights = init_weights(len(vocab), *sizes, seed=args.seed)
    _log(f"EWT train: {len(train)} sentences, dev {len(dev_s)}, test {len(test_s)}; "
         f"vocabulary {len(vocab)}; Embedding({len(vocab)}, {sizes[0]}) -> "
         f"Bidirectional(LSTM({sizes[1]})) -> Dense({sizes[2]}, softmax); batch "
         f"{args.batch_size}, {args.epochs} epochs, Adam lr {args.lr}")
    model, res = run_fastseq(train, dev, test, vocab, weights, args, sizes)
    results = [res]
    for fw in compare:
        results.append(_compare_in_subprocess(fw, args))
    _log("")
    _log(f"{'framework':10s} {'test acc':>9s} {'dev acc':>9s} {'s/epoch':>9s} "
         f"{'ms/batch':>9s} {'speed-up':>9s}")
    n_batches = len(_epoch_batches(train, vocab, args.batch_size, args.seed, 0))
    base = np.mean(res["epoch_time"][1:] or res["epoch_time"])
    for r in results:
        # the first epoch includes compilation / tracing; the mean of the others is shown
        per_epoch = float(np.mean(r["epoch_time"][1:] or r["epoch_time"]))
        r["mean_epoch_time"] = per_epoch
        _log(f"{r['framework']:10s} {r['test_accuracy']:9.4f} {r['dev_accuracy'][-1]:9.4f} "
             f"{per_epoch:9.2f} {per_epoch / n_batches * 1e3:9.2f} "
             f"{per_epoch / base:8.2f}x")
    if not args.no_save:
        info = {"epochs": args.epochs, "test_accuracy": res["test_accuracy"],
                "dev_accuracy": res["dev_accuracy"][-1]}
        npz, js = save_tagger(model, vocab, args.save, info=info)
        _log(f"saved {npz} and {js}")
    if args.tag is not None:
        _print_tags(tag_sentence(model, vocab, args.tag))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "batches_per_epoch": n_batches}, f, indent=1,
                      default=float)
        _log(f"wrote {args.json}")
    return 0


def run_cli(args):
    """Run parsed ``train-tagger`` arguments; errors become exit status 2 with a
    one-line message (for a CLI that adds ``build_parser`` to its own subparser)."""
    try:
        return run(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"fastseq train-tagger: error: {exc}", file=sys.stderr)
        return 2


def main_train_tagger(argv=None):
    """Entry point of ``fastseq train-tagger``; returns the exit status."""
    return run_cli(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main_train_tagger())
