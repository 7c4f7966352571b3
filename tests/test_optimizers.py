"""fastseq.optimizers apply the update Keras 3's optimizers apply to the same gradients:
Adam, SGD (momentum, nesterov), clipping by norm / global norm / value, weight decay,
sparse (row) gradients as TensorFlow's IndexedSlices, configs read from Keras."""
import numpy as np
import pytest

import keras  # a test dependency: fail loudly if it is missing, never skip
import tensorflow as tf

import fastseq
from fastseq import optimizers
from fastseq.optimizers import SparseRows

SHAPES = [(5, 8), (8,), (3, 4)]


def _weights(rng, dtype):
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def _grads(rng, dtype, scale=1.0):
    return [(scale * rng.standard_normal(s)).astype(dtype) for s in SHAPES]


def _run_both(keras_opt, mine, dtype, steps=5, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    w0 = _weights(rng, dtype)
    kv = [keras.Variable(w, dtype=dtype) for w in w0]
    ws = [w.copy() for w in w0]
    for _ in range(steps):
        g = _grads(rng, dtype, scale)
        keras_opt.apply([tf.constant(a) for a in g], kv)
        mine.apply(g, ws)
    return [v.numpy() for v in kv], ws


TOL = {"float32": (1e-6, 1e-5), "float64": (1e-13, 1e-12)}

CASES = {
    "adam": (lambda: keras.optimizers.Adam(), lambda: optimizers.Adam()),
    "adam_custom": (lambda: keras.optimizers.Adam(0.01, beta_1=0.8, beta_2=0.99,
                                                  epsilon=1e-5, amsgrad=True),
                    lambda: optimizers.Adam(0.01, beta_1=0.8, beta_2=0.99, epsilon=1e-5,
                                            amsgrad=True)),
    "adam_weight_decay": (lambda: keras.optimizers.Adam(weight_decay=0.1),
                          lambda: optimizers.Adam(weight_decay=0.1)),
    "sgd": (lambda: keras.optimizers.SGD(), lambda: optimizers.SGD()),
    "sgd_momentum": (lambda: keras.optimizers.SGD(0.1, momentum=0.9),
                     lambda: optimizers.SGD(0.1, momentum=0.9)),
    "sgd_nesterov": (lambda: keras.optimizers.SGD(0.05, momentum=0.7, nesterov=True),
                     lambda: optimizers.SGD(0.05, momentum=0.7, nesterov=True)),
    "clipnorm": (lambda: keras.optimizers.Adam(clipnorm=0.5),
                 lambda: optimizers.Adam(clipnorm=0.5)),
    "global_clipnorm": (lambda: keras.optimizers.SGD(0.1, momentum=0.5,
                                                     global_clipnorm=1.0),
                        lambda: optimizers.SGD(0.1, momentum=0.5, global_clipnorm=1.0)),
    "clipvalue": (lambda: keras.optimizers.Adam(clipvalue=0.3),
                  lambda: optimizers.Adam(clipvalue=0.3)),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_step_parity_with_keras(case, dtype):
    make_keras, make_mine = CASES[case]
    kopt = make_keras()
    want, got = _run_both(kopt, make_mine(), dtype, steps=6, scale=2.0)
    atol, rtol = TOL[dtype]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


def test_clipping_is_active():
    """The clipping cases above change the update (they test something)."""
    rng = np.random.default_rng(0)
    g = _grads(rng, "float64", scale=5.0)
    for kw in ({"clipnorm": 0.5}, {"clipvalue": 0.3}, {"global_clipnorm": 1.0}):
        w1 = _weights(np.random.default_rng(1), "float64")
        w2 = [w.copy() for w in w1]
        optimizers.SGD(0.1, **kw).apply(g, w1)
        optimizers.SGD(0.1).apply(g, w2)
        assert not all(np.allclose(a, b) for a, b in zip(w1, w2)), kw


@pytest.mark.parametrize("kw", [{}, {"clipnorm": 0.05}, {"clipvalue": 0.02},
                                {"global_clipnorm": 0.1}])
@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_sparse_rows_like_indexed_slices(kind, kw):
    """Row gradients with repeated indices behave as TensorFlow's IndexedSlices do in
    Keras's optimizers (clipping on the rows, Adam's v from squared rows)."""
    rng = np.random.default_rng(3)
    V, E = 6, 3
    w0 = rng.standard_normal((V, E)).astype(np.float32)
    d0 = rng.standard_normal((4, 2)).astype(np.float32)
    kv = [keras.Variable(w0), keras.Variable(d0)]
    mine = [w0.copy(), d0.copy()]
    if kind == "adam":
        kopt, opt = keras.optimizers.Adam(0.01, **kw), optimizers.Adam(0.01, **kw)
    else:
        kopt = keras.optimizers.SGD(0.1, momentum=0.9, **kw)
        opt = optimizers.SGD(0.1, momentum=0.9, **kw)
    for _ in range(4):
        idx = rng.integers(0, V, size=8)
        idx[:3] = 2  # duplicates
        rows = (0.1 * rng.standard_normal((8, E))).astype(np.float32)
        dg = (0.1 * rng.standard_normal((4, 2))).astype(np.float32)
        kopt.apply([tf.IndexedSlices(tf.constant(rows), tf.constant(idx),
                                     tf.constant([V, E])), tf.constant(dg)], kv)
        opt.apply([SparseRows(idx, rows, (V, E)), dg], mine)
    for a, v in zip(mine, kv):
        np.testing.assert_allclose(a, v.numpy(), rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("amsgrad", [False, True])
def test_sparse_adam_equals_dense_adam(amsgrad):
    """Adam with row gradients (no repeated index) updates every row exactly as with
    the same gradient given dense: rows without gradient, updated in long flat runs
    (here runs longer than one 512-value block, E not dividing 512), included."""
    rng = np.random.default_rng(7)
    V, E = 300, 7
    w0 = rng.standard_normal((V, E)).astype(np.float32)
    sparse, dense = w0.copy(), w0.copy()
    o_sparse = optimizers.Adam(0.01, amsgrad=amsgrad)
    o_dense = optimizers.Adam(0.01, amsgrad=amsgrad)
    for step in range(3):
        idx = rng.choice(V, size=5, replace=False)
        idx[0] = [0, V - 1, 150][step]  # first row, last row, a middle one
        rows = rng.standard_normal((5, E)).astype(np.float32)
        g = np.zeros((V, E), np.float32)
        g[idx] = rows
        o_sparse.apply([SparseRows(idx, rows, (V, E))], [sparse])
        o_dense.apply([g], [dense])
        np.testing.assert_array_equal(sparse, dense)
    assert not np.array_equal(sparse, w0)


@pytest.mark.parametrize("sparse", [False, True])
def test_adam_updates_any_memory_layout(sparse):
    """A Fortran-ordered or strided variable is updated exactly as its C-ordered copy
    (the kernels run on flat memory)."""
    rng = np.random.default_rng(11)
    V, E = 40, 6
    base = rng.standard_normal((V, E)).astype(np.float32)
    c_order = base.copy()
    f_order = np.asfortranarray(base)
    holder = np.zeros((V, 2 * E), np.float32)
    strided = holder[:, ::2]
    strided[...] = base
    opts = [optimizers.Adam(0.01, amsgrad=True) for _ in range(3)]
    for _ in range(3):
        idx = rng.choice(V, size=7, replace=False)
        rows = rng.standard_normal((7, E)).astype(np.float32)
        if sparse:
            g = SparseRows(idx, rows, (V, E))
        else:
            g = np.zeros((V, E), np.float32)
            g[idx] = rows
        for opt, var in zip(opts, (c_order, f_order, strided)):
            opt.apply([g], [var])
    np.testing.assert_array_equal(f_order, c_order)
    np.testing.assert_array_equal(strided, c_order)
    assert f_order.flags.f_contiguous and np.shares_memory(strided, holder)
    assert not np.array_equal(c_order, base)


def test_adam_on_several_threads_equals_one_thread(monkeypatch):
    """With a small per-thread size, a variable's Adam update is cut into ranges on
    several threads (dense and row gradients); the result is bit for bit the one-thread
    update (each element's update is independent)."""
    from fastseq import config
    if fastseq.get_num_threads() < 2:
        pytest.skip("needs two threads for fastseq (NUMBA_NUM_THREADS >= 2); CI has two")
    rng = np.random.default_rng(5)
    V, E = 50, 9
    w0 = [rng.standard_normal((V, E)).astype(np.float32),
          rng.standard_normal((7, 11)).astype(np.float32)]
    grads = []
    for _ in range(3):
        idx = rng.integers(0, V, size=12)
        grads.append([SparseRows(idx, rng.standard_normal((12, E)).astype(np.float32),
                                 (V, E)), rng.standard_normal((7, 11)).astype(np.float32)])
    calls = []
    for name in ("_adam_kernel", "_adam_rows_kernel"):
        kernel = getattr(optimizers, name)
        monkeypatch.setattr(optimizers, name,
                            lambda *a, _k=kernel, _n=name: (calls.append(_n), _k(*a))[1])

    def run(min_items):
        monkeypatch.setattr(config, "OPTIMIZER_MIN_ITEMS_PER_THREAD", min_items)
        ws, opt = [w.copy() for w in w0], optimizers.Adam(0.01)
        for g in grads:
            opt.apply(g, ws)
        return ws

    one = run(10 ** 9)
    assert calls == ["_adam_rows_kernel", "_adam_kernel"] * 3
    calls.clear()
    several = run(8)
    assert calls.count("_adam_rows_kernel") >= 6 and calls.count("_adam_kernel") >= 6
    for a, b in zip(several, one):
        np.testing.assert_array_equal(a, b)

@pytest.mark.parametrize("make", [lambda: optimizers.Adam(0.01),
                                  lambda: optimizers.Adam(0.01, amsgrad=True, clipnorm=0.5),
                                  lambda: optimizers.SGD(0.1, momentum=0.9)])
def test_dense_updates_beside_the_row_updates_equal_one_thread(monkeypatch, make):
    """With two threads, a step with a row-sparse gradient runs the dense variables'
    updates on a second thread meanwhile (optimizers._split_beside); the weights are
    bit for bit those of the one-thread order, and the dense updates did run there."""
    import threading
    from fastseq import config
    if fastseq.get_num_threads() < 2:
        pytest.skip("needs two threads for fastseq (NUMBA_NUM_THREADS >= 2); CI has two")
    rng = np.random.default_rng(8)
    V, E = 40, 6
    w0 = [rng.standard_normal((V, E)).astype(np.float32),
          rng.standard_normal((9, 13)).astype(np.float32),
          rng.standard_normal(13).astype(np.float32)]
    grads = [[SparseRows(rng.integers(0, V, 10),
                         rng.standard_normal((10, E)).astype(np.float32), (V, E)),
              rng.standard_normal((9, 13)).astype(np.float32),
              rng.standard_normal(13).astype(np.float32)] for _ in range(4)]
    where = []
    cls = type(make())
    real = cls._update

    def spy(self, i, g, v, step):
        where.append((i, threading.current_thread() is threading.main_thread()))
        return real(self, i, g, v, step)
    monkeypatch.setattr(cls, "_update", spy)

    def run(min_items):
        monkeypatch.setattr(config, "OPTIMIZER_BESIDE_MIN_ITEMS", min_items)
        ws, opt = [w.copy() for w in w0], make()
        for g in grads:
            opt.apply(g, ws)
        assert opt.iterations == len(grads)
        return ws

    one = run(10 ** 12)
    assert all(main for _, main in where)
    where.clear()
    beside = run(1)
    assert sorted(set(where)) == [(0, True), (1, False), (2, False)]
    for a, b in zip(beside, one):
        np.testing.assert_array_equal(a, b)


def test_an_error_beside_is_raised_after_both_threads_finish(monkeypatch):
    """A dense update that fails on the second thread raises from apply, once the
    row-sparse update on this thread is done too; the step is not counted."""
    from fastseq import config
    if fastseq.get_num_threads() < 2:
        pytest.skip("needs two threads for fastseq (NUMBA_NUM_THREADS >= 2); CI has two")
    monkeypatch.setattr(config, "OPTIMIZER_BESIDE_MIN_ITEMS", 1)
    rng = np.random.default_rng(9)
    ws = [rng.standard_normal((20, 4)).astype(np.float32),
          rng.standard_normal((5, 3)).astype(np.float32)]
    g = [SparseRows([1, 2], np.ones((2, 4), np.float32), (20, 4)),
         np.ones((5, 3), np.float32)]
    opt = optimizers.Adam(0.01)
    real = optimizers.Adam._update
    done = []

    def update(self, i, gi, v, step):
        if i == 1:
            raise RuntimeError("dense update failed")
        real(self, i, gi, v, step)
        done.append(i)
    monkeypatch.setattr(optimizers.Adam, "_update", update)
    before = ws[0].copy()
    with pytest.raises(RuntimeError, match="dense update failed"):
        opt.apply(g, ws)
    assert done == [0] and not np.array_equal(ws[0], before)
    assert opt.iterations == 0


def test_sparse_rows_to_dense():
    sr = SparseRows([1, 1, 3], np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), (4, 2))
    np.testing.assert_array_equal(sr.to_dense(), [[0, 0], [4, 6], [0, 0], [5, 6]])
    np.testing.assert_array_equal(sr.to_dense(square=True),
                                  [[0, 0], [10, 20], [0, 0], [25, 36]])
    with pytest.raises(ValueError, match="SparseRows"):
        SparseRows([0, 1], np.zeros((3, 2)), (4, 2))


def test_from_keras_reads_the_config():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(0.003, beta_1=0.8, epsilon=1e-6,
                                                  clipnorm=1.5), loss="mse")
    opt = optimizers.from_keras(model)
    assert isinstance(opt, optimizers.Adam)
    assert (opt.learning_rate, opt.beta_1, opt.beta_2, opt.epsilon, opt.clipnorm) == \
        pytest.approx((0.003, 0.8, 0.999, 1e-6, 1.5))
    sgd = optimizers.from_keras(keras.optimizers.SGD(0.2, momentum=0.5, nesterov=True))
    assert isinstance(sgd, optimizers.SGD)
    assert (sgd.learning_rate, sgd.momentum, sgd.nesterov) == \
        pytest.approx((0.2, 0.5, True))
    with pytest.raises(ValueError, match="not supported"):
        optimizers.from_keras(keras.optimizers.RMSprop())
    sched = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9)
    with pytest.raises(ValueError, match="schedule"):
        optimizers.from_keras(keras.optimizers.Adam(sched))


def test_defaults_are_keras_defaults():
    k, m = keras.optimizers.Adam(), optimizers.Adam()
    assert (m.learning_rate, m.beta_1, m.beta_2, m.epsilon, m.amsgrad) == pytest.approx(
        (float(k.learning_rate.numpy()), k.beta_1, k.beta_2, k.epsilon, k.amsgrad))
    k, m = keras.optimizers.SGD(), optimizers.SGD()
    assert (m.learning_rate, m.momentum, m.nesterov) == pytest.approx(
        (float(k.learning_rate.numpy()), k.momentum, k.nesterov))


def test_get_and_errors():
    assert isinstance(optimizers.get("adam"), optimizers.Adam)
    assert isinstance(optimizers.get("SGD"), optimizers.SGD)
    opt = optimizers.get({"class_name": "Adam", "config": {"learning_rate": 0.5}})
    assert opt.learning_rate == 0.5
    with pytest.raises(ValueError, match="unknown optimizer"):
        optimizers.get("adagrad")
    with pytest.raises(ValueError, match="only one of"):
        optimizers.Adam(clipnorm=1.0, clipvalue=1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        optimizers.SGD(-1.0)
    with pytest.raises(ValueError, match="beta_1"):
        optimizers.Adam(beta_1=1.5)
    opt = optimizers.Adam()
    w = [np.zeros(3, np.float32)]
    with pytest.raises(ValueError, match="shape"):
        opt.apply([np.zeros(4, np.float32)], w)
    opt.apply([np.ones(3, np.float32)], w)
    assert opt.iterations == 1
    with pytest.raises(ValueError, match="differ"):
        opt.apply([np.ones(2, np.float32)], [np.zeros(2, np.float32)])
    with pytest.raises(ValueError, match="no gradients"):
        opt.apply([None], w)
