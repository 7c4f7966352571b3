"""ONNX graphs of the benchmark's taggers, built from Keras-layout weights.

Used by the benchmark only (ONNX Runtime is one of the compared providers); the graphs are
built with ``onnx.helper`` directly from the weight arrays, no converter involved.

Layout conversions (Keras -> ONNX LSTM):

* Keras kernel ``[D, 4H]`` / recurrent kernel ``[H, 4H]`` hold gates in order i, f, c, o
  along the last axis; ONNX ``W`` is ``[num_directions, 4H, D]`` and ``R``
  ``[num_directions, 4H, H]`` with gates in order i, o, f, c.
* ONNX ``B`` is ``[num_directions, 8H]`` = input bias ``Wb`` then recurrent bias ``Rb``;
  the Keras bias goes in ``Wb``, zeros in ``Rb``.
* ONNX LSTM is time-major (``[T, B, D]`` in, ``Y`` = ``[T, num_directions, B, H]`` out):
  the graphs take batch-major input and transpose around the LSTM.
* Masked variable-length input uses the LSTM's ``sequence_lens``: outputs past a row's
  length are zero, and the reverse direction runs over each sequence within its own length,
  which is what Keras's masked backward pass computes for right-padded input.
"""
from __future__ import annotations

import numpy as np

__all__ = ["keras_lstm_to_onnx_weights", "lstm_tagger_onnx", "bilstm_tagger_onnx",
           "DEFAULT_OPSET"]

DEFAULT_OPSET = 17


def _onnx():
    try:
        import onnx
        from onnx import helper, numpy_helper, TensorProto
    except ImportError as exc:  # pragma: no cover - exercised only without onnx
        raise ImportError("fastseq.onnx_export needs the 'onnx' package "
                          "(pip install fastseq[bench])") from exc
    return onnx, helper, numpy_helper, TensorProto


def _reorder_gates(a: np.ndarray, hidden: int) -> np.ndarray:
    """Last axis [i, f, c, o] (Keras) -> [i, o, f, c] (ONNX)."""
    i, f, c, o = (a[..., k * hidden:(k + 1) * hidden] for k in range(4))
    return np.concatenate([i, o, f, c], axis=-1)


def keras_lstm_to_onnx_weights(kernel, recurrent_kernel, bias=None):
    """Keras LSTM weights -> ONNX (W, R, B) for one direction, each with a leading
    num_directions axis of 1: W [1, 4H, D], R [1, 4H, H], B [1, 8H] (float32)."""
    kernel = np.asarray(kernel, dtype=np.float32)
    recurrent_kernel = np.asarray(recurrent_kernel, dtype=np.float32)
    hidden = recurrent_kernel.shape[0]
    if kernel.ndim != 2 or kernel.shape[1] != 4 * hidden:
        raise ValueError(f"kernel must be [D, 4H] = [D, {4 * hidden}]; got {kernel.shape}")
    if recurrent_kernel.shape != (hidden, 4 * hidden):
        raise ValueError(f"recurrent_kernel must be [H, 4H]; got {recurrent_kernel.shape}")
    if bias is None:
        bias = np.zeros(4 * hidden, np.float32)
    bias = np.asarray(bias, dtype=np.float32)
    if bias.shape != (4 * hidden,):
        raise ValueError(f"bias must be [4H] = [{4 * hidden}]; got {bias.shape}")
    w = _reorder_gates(kernel, hidden).T[None]            # [1, 4H, D]
    r = _reorder_gates(recurrent_kernel, hidden).T[None]  # [1, 4H, H]
    b = np.concatenate([_reorder_gates(bias, hidden),
                        np.zeros(4 * hidden, np.float32)])[None]  # [1, 8H]
    return (np.ascontiguousarray(w), np.ascontiguousarray(r), np.ascontiguousarray(b))


def _init(numpy_helper, name, array):
    return numpy_helper.from_array(np.ascontiguousarray(array), name=name)


def _finish(onnx, helper, graph, opset):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="fastseq.onnx_export")
    # Keep the IR version loadable by older ONNX Runtime builds.
    model.ir_version = min(model.ir_version, 8)
    onnx.checker.check_model(model)
    return model


def lstm_tagger_onnx(kernel, recurrent_kernel, bias, dense_kernel, dense_bias=None, *,
                     opset: int = DEFAULT_OPSET):
    """ONNX model of ``LSTM(H, return_sequences=True) -> Dense(K) -> softmax``.

    Input ``x``: float32 [B, T, D] (batch-major, any B and T); output ``probs``: float32
    [B, T, K].  Weights in Keras layout: kernel [D, 4H], recurrent_kernel [H, 4H],
    bias [4H] (or None), dense_kernel [H, K], dense_bias [K] (or None).
    """
    onnx, helper, numpy_helper, TensorProto = _onnx()
    w, r, b = keras_lstm_to_onnx_weights(kernel, recurrent_kernel, bias)
    hidden = r.shape[2]
    dim = w.shape[2]
    dk = np.asarray(dense_kernel, np.float32)
    if dk.ndim != 2 or dk.shape[0] != hidden:
        raise ValueError(f"dense_kernel must be [H, K] = [{hidden}, K]; got {dk.shape}")
    k = dk.shape[1]
    db = np.zeros(k, np.float32) if dense_bias is None else np.asarray(dense_bias, np.float32)
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_tbd"], perm=[1, 0, 2]),
        helper.make_node("LSTM", ["x_tbd", "W", "R", "B"], ["Y"], hidden_size=hidden,
                         direction="forward"),
        # Y: [T, 1, B, H] -> [T, B, H] -> [B, T, H]
        helper.make_node("Squeeze", ["Y", "axis1"], ["Y_tbh"]),
        helper.make_node("Transpose", ["Y_tbh"], ["h_bth"], perm=[1, 0, 2]),
        helper.make_node("MatMul", ["h_bth", "Wd"], ["logits0"]),
        helper.make_node("Add", ["logits0", "bd"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    inits = [_init(numpy_helper, "W", w), _init(numpy_helper, "R", r),
             _init(numpy_helper, "B", b), _init(numpy_helper, "Wd", dk),
             _init(numpy_helper, "bd", db),
             _init(numpy_helper, "axis1", np.asarray([1], np.int64))]
    graph = helper.make_graph(
        nodes, "fastseq_lstm_tagger",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "time", dim])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", "time", k])],
        initializer=inits)
    return _finish(onnx, helper, graph, opset)


def bilstm_tagger_onnx(embeddings, forward, backward, dense_kernel, dense_bias=None, *,
                       opset: int = DEFAULT_OPSET):
    """ONNX model of ``Embedding -> Bidirectional(LSTM(H, return_sequences=True),
    merge_mode="concat") -> Dense(K) -> softmax`` on right-padded variable-length input.

    ``embeddings``: [V, E]; ``forward`` / ``backward``: (kernel [E, 4H],
    recurrent_kernel [H, 4H], bias [4H] or None) in Keras layout; ``dense_kernel``
    [2H, K] (rows: forward units then backward units, as Keras concatenates them).
    Inputs: ``ids`` int64 [B, T] and ``seq_lens`` int32 [B] (each row's number of real
    tokens, >= 1).  Output ``probs`` float32 [B, T, K]; rows past their length hold the
    softmax of the bias only (the LSTM outputs zeros there) - ignore them.
    """
    onnx, helper, numpy_helper, TensorProto = _onnx()
    emb = np.asarray(embeddings, np.float32)
    wf, rf, bf = keras_lstm_to_onnx_weights(*forward)
    wb, rb, bb = keras_lstm_to_onnx_weights(*backward)
    if wf.shape != wb.shape or rf.shape != rb.shape:
        raise ValueError(f"forward and backward LSTM weights differ in shape: "
                         f"{wf.shape}/{rf.shape} vs {wb.shape}/{rb.shape}")
    hidden = rf.shape[2]
    if emb.ndim != 2 or emb.shape[1] != wf.shape[2]:
        raise ValueError(f"embeddings must be [V, E] with E = {wf.shape[2]} (the LSTM "
                         f"input size); got {emb.shape}")
    dk = np.asarray(dense_kernel, np.float32)
    if dk.ndim != 2 or dk.shape[0] != 2 * hidden:
        raise ValueError(f"dense_kernel must be [2H, K] = [{2 * hidden}, K]; got {dk.shape}")
    k = dk.shape[1]
    db = np.zeros(k, np.float32) if dense_bias is None else np.asarray(dense_bias, np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["x_bte"], axis=0),
        helper.make_node("Transpose", ["x_bte"], ["x_tbe"], perm=[1, 0, 2]),
        helper.make_node("LSTM", ["x_tbe", "W", "R", "B", "seq_lens"], ["Y"],
                         hidden_size=hidden, direction="bidirectional"),
        # Y: [T, 2, B, H] -> [B, T, 2, H] -> [B, T, 2H]  (forward units, then backward)
        helper.make_node("Transpose", ["Y"], ["Y_bt2h"], perm=[2, 0, 1, 3]),
        helper.make_node("Reshape", ["Y_bt2h", "shape_bt_"], ["h_bth"]),
        helper.make_node("MatMul", ["h_bth", "Wd"], ["logits0"]),
        helper.make_node("Add", ["logits0", "bd"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    inits = [
        _init(numpy_helper, "emb", emb),
        _init(numpy_helper, "W", np.concatenate([wf, wb])),
        _init(numpy_helper, "R", np.concatenate([rf, rb])),
        _init(numpy_helper, "B", np.concatenate([bf, bb])),
        _init(numpy_helper, "Wd", dk),
        _init(numpy_helper, "bd", db),
        _init(numpy_helper, "shape_bt_", np.asarray([0, 0, 2 * hidden], np.int64)),
    ]
    graph = helper.make_graph(
        nodes, "fastseq_bilstm_tagger",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "time"]),
         helper.make_tensor_value_info("seq_lens", TensorProto.INT32, ["batch"])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", "time", k])],
        initializer=inits)
    return _finish(onnx, helper, graph, opset)
