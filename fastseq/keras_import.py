"""Import a Keras 3 sequence model into fastseq: ``from_keras(keras_model) -> Model``.

A supported model is one chain of single-input layers (a ``Sequential`` model, or a
functional model with one input and one path, nested models allowed):

* ``Embedding`` (first layer only; ``mask_zero=True`` gives mask = ids != 0),
* ``Masking`` (mask = any(x != mask_value, -1), output x where mask else 0),
* ``LSTM`` (any activations, ``use_bias``, ``go_backwards``, ``zero_output_for_mask``,
  ``return_sequences``; dropouts are inactive at inference),
* ``Bidirectional(LSTM)`` with every ``merge_mode`` (``None`` only as the last layer:
  the output is the list [forward, backward]),
* ``Dense`` / ``TimeDistributed(Dense)`` on inputs of any rank,
* ``Dropout``, ``SpatialDropout1D``, ``GaussianNoise``, ``GaussianDropout``,
  ``AlphaDropout``, ``Identity`` (the identity at inference),
* ``Activation`` and ``Softmax``.

The mask [B, T] flows between layers as in Keras: LSTM and Bidirectional keep it with
``return_sequences`` and drop it otherwise; Dense, TimeDistributed, the dropouts and the
activations pass it on; Masking and Embedding(mask_zero) set it.  Keras's Bidirectional
forces ``zero_output_for_mask = return_sequences`` on both inner LSTMs when it is built,
so the inner layers' attributes (read here) already carry that.  A Softmax layer that
receives a mask applies it the way Keras does (masked logits set to -1e9, masked outputs
to 0, the [B, T] mask broadcast against the input from the right).

All LSTM and Dense compute goes through ``fastseq.lstm`` / ``fastseq.dense``; the
embedding lookup is ``np.take``; merges, masking and stand-alone activations are NumPy.
Each layer computes in float64 when its Keras compute dtype is float64, else in float32.
"""
import types

import numpy as np
from scipy import special

from . import _cpu, _validate, config
from ._threads import run_pair
from .ops import DENSE_ACTIVATIONS, LSTM_ACTIVATIONS, _lstm_args, dense, lstm, lstm_dense

__all__ = ["from_keras", "Model"]


def _hard_sigmoid(x):
    return np.clip(x + 3, 0, 6) / 6  # Keras 3: relu6(x + 3) / 6


def _elu(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))


_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772, 1.0507009873554805

# Activations of Activation layers (and of a Dense layer whose activation fastseq.dense
# does not fuse), applied over the last axis.
NUMPY_ACTIVATIONS = {
    "linear": lambda x: x,
    "relu": lambda x: np.maximum(x, 0),
    "relu6": lambda x: np.clip(x, 0, 6),
    "sigmoid": special.expit,
    "hard_sigmoid": _hard_sigmoid,
    "tanh": np.tanh,
    "softmax": lambda x: special.softmax(x, axis=-1),
    "log_softmax": lambda x: special.log_softmax(x, axis=-1),
    "softplus": lambda x: np.logaddexp(x, 0),
    "softsign": lambda x: x / (np.abs(x) + 1),
    "elu": _elu,
    "selu": lambda x: _SELU_SCALE * np.where(x > 0, x, _SELU_ALPHA * np.expm1(
        np.minimum(x, 0))),
    "exponential": np.exp,
    "silu": lambda x: x * special.expit(x),
}


# --- layer records ----------------------------------------------------------------------
class Layer:
    """One imported Keras layer: its Keras name and class, the dtype it computes in, its
    weights as NumPy arrays (attributes of the subclass) and its forward pass
    ``forward(x, mask, device) -> (y, mask)``."""

    def __init__(self, name, keras_class, dtype):
        self.name = name                # the Keras layer's name
        self.keras_class = keras_class  # e.g. "LSTM", "TimeDistributed(Dense)"
        self.dtype = np.dtype(dtype)    # float32 or float64
        self._dev = None                # weights uploaded to the GPU (Model._upload)

    def forward(self, x, mask, device="auto"):
        raise NotImplementedError

    def _cast(self, x):
        return np.asarray(x).astype(self.dtype, copy=False)

    def __repr__(self):
        arrays = {k: v.shape for k, v in vars(self).items() if isinstance(v, np.ndarray)}
        extra = "".join(f", {k}={v}" for k, v in arrays.items())
        return (f"<{type(self).__name__} {self.name!r} ({self.keras_class}), "
                f"{self.dtype}{extra}>")


class Embedding(Layer):
    """embeddings [V, E]; ids [B, T] -> [B, T, E]."""

    def __init__(self, name, keras_class, dtype, embeddings, mask_zero):
        super().__init__(name, keras_class, dtype)
        self.embeddings = embeddings
        self.mask_zero = bool(mask_zero)

    def forward(self, x, mask, device="auto"):
        y = np.take(self.embeddings, x, axis=0)
        return y, (x != 0 if self.mask_zero else None)


class Masking(Layer):
    def __init__(self, name, keras_class, dtype, mask_value):
        super().__init__(name, keras_class, dtype)
        self.mask_value = self.dtype.type(mask_value)

    def forward(self, x, mask, device="auto"):
        x = self._cast(x)
        keep = np.any(x != self.mask_value, axis=-1)
        return np.where(keep[..., None], x, self.dtype.type(0)), keep


class LSTM(Layer):
    """kernel [D, 4H], recurrent_kernel [H, 4H], bias [4H] or None (gates i, f, c, o)."""

    def __init__(self, name, keras_class, dtype, kernel, recurrent_kernel, bias, *,
                 return_sequences, go_backwards, zero_output_for_mask, activation,
                 recurrent_activation, dropout=0.0, recurrent_dropout=0.0):
        super().__init__(name, keras_class, dtype)
        # inactive at inference; training refuses a layer where they are nonzero
        self.dropout = float(dropout)
        self.recurrent_dropout = float(recurrent_dropout)
        self.kernel = kernel
        self.recurrent_kernel = recurrent_kernel
        self.bias = bias
        self.return_sequences = bool(return_sequences)
        self.go_backwards = bool(go_backwards)
        self.zero_output_for_mask = bool(zero_output_for_mask)
        self.activation = activation
        self.recurrent_activation = recurrent_activation

    def forward(self, x, mask, device="auto"):
        if self._dev is not None and _on_cuda(device, x):
            return self._forward_cuda(x, mask), (mask if self.return_sequences else None)
        y = lstm(self._cast(x), self.kernel, self.recurrent_kernel, self.bias, mask=mask,
                 return_sequences=self.return_sequences, go_backwards=self.go_backwards,
                 zero_output_for_mask=self.zero_output_for_mask,
                 activation=self.activation,
                 recurrent_activation=self.recurrent_activation, device=device)
        return y, (mask if self.return_sequences else None)

    def _forward_cuda(self, x, mask):
        """The GPU path with the weights uploaded once per model (``Model._upload``)."""
        from . import _cuda
        a = _lstm_args("lstm", self._cast(x), self.kernel, self.recurrent_kernel,
                       self.bias, None, mask, self.return_sequences, self.go_backwards,
                       self.zero_output_for_mask, self.activation,
                       self.recurrent_activation, "cuda")
        return _cuda.lstm_cuda(*a["arrays"], **a["flags"], weights=self._dev)[0]

    def upload(self):
        from . import _cuda
        self._dev = _cuda.upload_lstm_weights(self.kernel, self.recurrent_kernel,
                                              self.bias, dtype=self.dtype)

    def forward_dense(self, x, mask, dense_layer, device="auto", version=None):
        """This layer (with return_sequences) followed by ``dense_layer`` in one pass
        (``fastseq.ops.lstm_dense``); the mask passes through both.  ``version``: the
        model's weights version, under which the weights packed for the two-thread
        split are kept (None: packed at each call)."""
        if device in ("auto", "cpu") and isinstance(x, np.ndarray):
            # host input on the CPU: the weights were checked at import, so the
            # argument checks of the public op are skipped (tens of microseconds,
            # which matter at batch 1)
            return self._forward_dense_cpu(x, mask, dense_layer, version), mask
        y = lstm_dense(self._cast(x), self.kernel, self.recurrent_kernel, self.bias,
                       dense_layer.kernel, dense_layer.bias, dense_layer.activation,
                       mask=mask, go_backwards=self.go_backwards,
                       zero_output_for_mask=self.zero_output_for_mask,
                       activation=self.activation,
                       recurrent_activation=self.recurrent_activation, device=device)
        return y, mask

    def _forward_dense_cpu(self, x, mask, dense_layer, version=None):
        return self._run_cpu(np.ascontiguousarray(self._cast(x)), self.kernel, mask,
                             dense_layer, version=version)

    def _run_cpu(self, x, W, mask, dense_layer=None, table=None, version=None):
        """The CPU driver on checked host arrays: x [B, T, D] with kernel W, or token ids
        [B, T] with the (embeddings @ W) ``table``; ``dense_layer`` as the epilogue;
        ``version`` as in ``forward_dense``."""
        U = self.recurrent_kernel
        b = self.bias if self.bias is not None else np.zeros(U.shape[1], self.dtype)
        ep = None
        if dense_layer is not None:
            K = dense_layer.kernel.shape[1]
            bd = (dense_layer.bias if dense_layer.bias is not None
                  else np.zeros(K, self.dtype))
            ep = (dense_layer.kernel, bd, dense_layer.activation)
        m = None if mask is None else np.ascontiguousarray(mask, dtype=bool)
        pack = None
        if version is not None and W is not None:
            def pack():
                return self.split_pack(b, version)
        return _cpu.lstm_forward(
            x, W, U, b, None, None, m, go_backwards=self.go_backwards,
            return_sequences=self.return_sequences,
            zero_output_for_mask=self.zero_output_for_mask,
            act=LSTM_ACTIVATIONS[self.activation],
            rec=LSTM_ACTIVATIONS[self.recurrent_activation], epilogue=ep,
            table=table, split_pack=pack)[0]

    def split_pack(self, b, version):
        """kernel, recurrent kernel and bias ``b`` packed for the two-thread split of
        small batches (``_cpu.split_pack_of``), cached per weights version (built at
        the first call that runs split)."""
        key = (id(self.kernel), id(self.recurrent_kernel), id(self.bias), version)
        if getattr(self, "_split_key", None) != key:
            self._split_pack = _cpu.split_pack_of(self.kernel, self.recurrent_kernel, b)
            self._split_key = key
        return self._split_pack

    def macs(self, shape):
        """Multiply-adds of a pass over input of ``shape`` [B, T, D] (D = 0: the input
        projection is a table lookup)."""
        B, T, D = (tuple(shape) + (0, 0, 0))[:3]
        G = self.recurrent_kernel.shape[1]
        return B * T * G * (D + self.recurrent_kernel.shape[0])

    def forward_table(self, ids, mask, embedding, version, dense_layer=None):
        """The LSTM fed by ``embedding`` on the CPU: the input projection of token ``i``
        is row ``i`` of the table (embeddings @ kernel), [V, 4H], built once per weights
        version; exact, since (E W)[i] = E[i] W.  With ``dense_layer`` the Dense runs on
        each chunk of outputs (as in ``forward_dense``)."""
        table = self.table_for(embedding, version)[0]
        return self._run_cpu(ids, None, mask, dense_layer, table=table)

    def table_for(self, embedding, version):
        """(embeddings @ kernel [V, 4H], the recurrent kernel cut into column blocks
        for the fused kernel, whether the recurrent kernel is finite), cached per
        weights version."""
        key = (id(embedding.embeddings), version)
        if getattr(self, "_table_key", None) != key:
            self._table = np.matmul(embedding.embeddings.astype(self.dtype, copy=False),
                                    self.kernel)
            self._blocks = _cpu.block_columns(self.recurrent_kernel)
            self._u_finite = bool(np.isfinite(self.recurrent_kernel).all())
            self._table_key = key
        return self._table, self._blocks, self._u_finite

    def fuses_with(self, layer):
        """True when ``forward_dense`` can run this layer and the Dense ``layer``."""
        return (self.return_sequences and type(layer) is Dense
                and layer.activation in DENSE_ACTIVATIONS and layer.dtype == self.dtype)


class Bidirectional(Layer):
    """Two LSTM records; the backward one's sequence output is flipped back to input time
    order before the merge ("concat", "sum", "mul", "ave", or None: a list of both)."""

    def __init__(self, name, keras_class, dtype, forward_layer, backward_layer, merge_mode):
        super().__init__(name, keras_class, dtype)
        self.forward_layer = forward_layer
        self.backward_layer = backward_layer
        self.merge_mode = merge_mode
        self.return_sequences = forward_layer.return_sequences

    def __repr__(self):
        return (f"<Bidirectional {self.name!r} (merge_mode={self.merge_mode!r}): "
                f"{self.forward_layer!r}, {self.backward_layer!r}>")

    def forward(self, x, mask, device="auto"):
        fwd, bwd = self.forward_layer, self.backward_layer
        if _validate.resolve_device("Bidirectional", device, x) == "cpu":
            # the two directions on two threads at once
            (y, _), (y_rev, _) = run_pair(lambda: fwd.forward(x, mask, device),
                                          lambda: bwd.forward(x, mask, device),
                                          fwd.macs(np.shape(x)))
        else:
            y, _ = fwd.forward(x, mask, device)
            y_rev, _ = bwd.forward(x, mask, device)
        return self._merge(y, y_rev, mask)

    def forward_table(self, ids, mask, embedding, version):
        """Fed by ``embedding``: both directions look their input projections up in
        (embeddings @ W) tables instead of multiplying (see ``LSTM.forward_table``)."""
        fwd, bwd = self.forward_layer, self.backward_layer
        y, y_rev = run_pair(lambda: fwd.forward_table(ids, mask, embedding, version),
                            lambda: bwd.forward_table(ids, mask, embedding, version),
                            fwd.macs(ids.shape[:2] + (0,)))
        return self._merge(y, y_rev, mask)[0]

    def fuses_with(self, layer):
        """True when ``forward_table_dense`` can run this layer and the Dense ``layer``:
        concat merge, sequences out, and a Dense over the concatenated features."""
        fwd, bwd = self.forward_layer, self.backward_layer
        return (self.merge_mode == "concat" and self.return_sequences
                and fwd.fuses_with(layer) and bwd.fuses_with(layer)
                and layer.kernel.shape[0] == fwd.recurrent_kernel.shape[0]
                + bwd.recurrent_kernel.shape[0])

    def forward_table_dense(self, ids, mask, embedding, version, dense_layer):
        """Fed by ``embedding`` and followed by ``dense_layer``: the Dense of the concat
        [h_f, h_b] is h_f Wd[:Hf] + h_b Wd[Hf:] + bd, so each direction applies its half
        of the Dense kernel to each chunk of its outputs (no [B, T, 2H] sequence, no
        concatenation); the two partial logits are then added, with the bias and the
        activation, in one pass."""
        fwd, bwd = self.forward_layer, self.backward_layer
        halves = self._dense_halves(dense_layer, version)
        K = dense_layer.kernel.shape[1]
        bd = (dense_layer.bias if dense_layer.bias is not None
              else np.zeros(K, self.dtype))
        B = ids.shape[0]
        H = max(fwd.recurrent_kernel.shape[0], bwd.recurrent_kernel.shape[0])
        if B * H * 4 * H < config.GEMM_MIN_STEP_MACS:
            # each direction in one Numba call, the second on the worker thread
            parts = []
            # the backward layer's sequence is flipped before the merge
            for layer, half, flip in ((fwd, halves[0], False), (bwd, halves[1], True)):
                table, blocks, u_finite = layer.table_for(embedding, version)
                b = (layer.bias if layer.bias is not None
                     else np.zeros(table.shape[1], self.dtype))
                parts.append((table, blocks, b, half.kernel_x, layer.go_backwards, flip,
                              layer.zero_output_for_mask,
                              LSTM_ACTIVATIONS[layer.activation],
                              LSTM_ACTIVATIONS[layer.recurrent_activation], u_finite))
            m8 = None if mask is None else np.ascontiguousarray(mask, dtype=bool).view(
                np.uint8)
            return _cpu.table_dense_pair(ids, m8, parts, bd, dense_layer.activation)
        y, y_rev = run_pair(
            lambda: fwd.forward_table(ids, mask, embedding, version, dense_layer=halves[0]),
            lambda: bwd.forward_table(ids, mask, embedding, version, dense_layer=halves[1]),
            fwd.macs(ids.shape[:2] + (0,)))
        y += y_rev[:, ::-1]     # the backward sequence is flipped before the merge
        _cpu.bias_act(y.reshape(-1, K), bd, dense_layer.activation)
        return y

    def _dense_halves(self, dense_layer, version):
        """The Dense kernel's rows for each direction, as linear Dense records without
        bias (cached per weights version)."""
        key = (id(dense_layer.kernel), version)
        if getattr(self, "_halves_key", None) != key:
            Hf = self.forward_layer.recurrent_kernel.shape[0]
            Wd = dense_layer.kernel
            self._halves = [
                types.SimpleNamespace(kernel=np.ascontiguousarray(part),
                                      kernel_x=_cpu.dense_pack(part), bias=None,
                                      activation="linear")
                for part in (Wd[:Hf], Wd[Hf:])]
            self._halves_key = key
        return self._halves

    def _merge(self, y, y_rev, mask):
        y, y_rev = self._cast(y), self._cast(y_rev)
        if self.return_sequences:
            y_rev = np.ascontiguousarray(y_rev[:, ::-1])
        out_mask = mask if self.return_sequences else None
        mode = self.merge_mode
        if mode is None:
            return [y, y_rev], out_mask
        if mode == "concat":
            out = np.concatenate([y, y_rev], axis=-1)
        elif mode == "sum":
            out = y + y_rev
        elif mode == "ave":
            out = (y + y_rev) / 2
        else:  # "mul"
            out = y * y_rev
        return out, out_mask


class Dense(Layer):
    """kernel [D, K], bias [K] or None; over the last axis of an input of any rank."""

    def __init__(self, name, keras_class, dtype, kernel, bias, activation):
        super().__init__(name, keras_class, dtype)
        self.kernel = kernel
        self.bias = bias
        self.activation = activation

    def forward(self, x, mask, device="auto"):
        fused = self.activation in DENSE_ACTIVATIONS
        if self._dev is not None and _on_cuda(device, x):
            from . import _cuda
            y = _cuda.dense_cuda(self._cast(x), self.kernel, self.bias,
                                 self.activation if fused else None, weights=self._dev)
        else:
            y = dense(self._cast(x), self.kernel, self.bias,
                      activation=self.activation if fused else None, device=device)
        if not fused:
            y = self._cast(NUMPY_ACTIVATIONS[self.activation](y))
        return y, mask


    def upload(self):
        from . import _cuda
        self._dev = _cuda.upload_dense_weights(self.kernel, self.bias, dtype=self.dtype)

    def argmax_cuda(self, x):
        """argmax over the last axis of this layer's output, on the GPU, without
        writing the probabilities (for a monotonic activation)."""
        from . import _cuda
        return _cuda.argmax_dense_cuda(self._cast(x), self.kernel, self.bias,
                                       self.activation, weights=self._dev)


def _on_cuda(device, x):
    return _validate.resolve_device("Model", device, x) == "cuda"


class Identity(Layer):
    """Dropout, SpatialDropout1D, GaussianNoise, ...: the identity at inference."""

    def forward(self, x, mask, device="auto"):
        return self._cast(x), mask


class Activation(Layer):
    def __init__(self, name, keras_class, dtype, activation):
        super().__init__(name, keras_class, dtype)
        self.activation = activation

    def forward(self, x, mask, device="auto"):
        return self._cast(NUMPY_ACTIVATIONS[self.activation](self._cast(x))), mask


class Softmax(Layer):
    def __init__(self, name, keras_class, dtype, axis):
        super().__init__(name, keras_class, dtype)
        self.axis = tuple(axis) if isinstance(axis, (list, tuple)) else int(axis)

    def forward(self, x, mask, device="auto"):
        x = self._cast(x)
        if mask is not None:
            # Keras broadcasts the mask against the input from the right and requires
            # every mask dimension to be 1 or equal to the input's.
            if mask.ndim > x.ndim or any(m not in (1, i) for m, i in
                                         zip(mask.shape[::-1], x.shape[::-1])):
                raise ValueError(
                    f"Softmax layer {self.name!r} receives the mask of shape {mask.shape} "
                    f"from earlier layers, which cannot be broadcast to its input of "
                    f"shape {x.shape} (Keras raises the same error for this model)")
            x = np.where(mask, x, self.dtype.type(-1e9))
        y = self._cast(special.softmax(x, axis=self.axis))
        if mask is not None:
            y = np.where(mask, y, self.dtype.type(0))
        return y, mask


# --- the model --------------------------------------------------------------------------
class Model:
    """A chain of imported layers with ``predict`` equal to the Keras model's.

    ``layers``: the layer records in call order; ``input_shape``: the Keras input shape
    (batch axis ``None``); ``device``: passed to ``fastseq.lstm`` / ``fastseq.dense``.
    """

    def __init__(self, layers, input_shape, device="auto", name=None):
        _validate.check_device("Model", device)
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("Model: `layers` must hold at least one layer")
        self.input_shape = tuple(input_shape)
        self.device = device
        self.name = name

    def __repr__(self):
        rows = "".join(f"\n  {layer!r}" for layer in self.layers)
        return (f"<fastseq.Model {self.name!r} input {self.input_shape}, "
                f"device={self.device!r}:{rows}>")

    def predict(self, x, batch_size=None):
        """What ``keras_model.predict(x)`` returns: a NumPy array (a list of two for a
        final Bidirectional with merge_mode=None).  ``batch_size=None`` runs the whole
        input in one pass; otherwise in slices of ``batch_size`` samples."""
        x = self._check_input(x)
        if batch_size is None:
            return self._forward(x)
        if isinstance(batch_size, (bool, np.bool_)) or not isinstance(
                batch_size, (int, np.integer)):
            raise TypeError(f"predict: `batch_size` must be None or a positive int, got "
                            f"{type(batch_size).__name__}")
        if batch_size < 1:
            raise ValueError(f"predict: `batch_size` must be None or a positive int, got "
                             f"{batch_size}")
        step = int(batch_size)
        parts = [self._forward(x[i:i + step]) for i in range(0, len(x), step)]
        if len(parts) == 1:
            return parts[0]
        if isinstance(parts[0], list):
            return [np.concatenate(p, axis=0) for p in zip(*parts)]
        return np.concatenate(parts, axis=0)

    def predict_classes(self, x, batch_size=None):
        """argmax over the last axis of ``predict(x)`` (per output for a list).  On the
        GPU, a final Dense with a monotonic activation runs a fused argmax kernel that
        never writes the probabilities."""
        last = self.layers[-1]
        if (self.device == "cuda" and type(last) is Dense and len(self.layers) > 1
                and last.activation in ("softmax", "log_softmax", "linear", "sigmoid",
                                        "tanh")):
            x = self._check_input(x)
            self._upload()
            step = len(x) if batch_size is None else int(batch_size)
            parts = []
            for i in range(0, len(x), max(1, step)):
                h = self._forward(x[i:i + step], layers=self.layers[:-1])
                parts.append(np.asarray(_to_host(last.argmax_cuda(h))))
            return np.concatenate(parts, axis=0)
        y = self.predict(x, batch_size)
        if isinstance(y, list):
            return [np.argmax(t, axis=-1) for t in y]
        return np.argmax(y, axis=-1)

    # --- training (fastseq.training); grads/weights in keras_model.trainable_weights order
    def compile(self, optimizer=None, loss=None, from_logits=False):
        """Set the optimizer (a name, a config dict, a ``fastseq.optimizers`` object, or
        a Keras optimizer) and the loss for ``fit`` / ``train_on_batch``.  Left out,
        each is the Keras model's own (a fresh optimizer with its class and
        configuration, and its loss) when that model was compiled, else Adam with
        Keras's defaults and sparse categorical cross-entropy."""
        from . import training
        keras_settings = getattr(self, "_keras_compile", None) or {}
        if optimizer is None:
            optimizer = keras_settings.get("optimizer", "adam")
            if isinstance(optimizer, Exception):
                raise ValueError(f"compile: the Keras model's own optimizer cannot be "
                                 f"used ({optimizer}); pass `optimizer`") from None
        if loss is None:
            loss = keras_settings.get("loss") or "sparse_categorical_crossentropy"
        return training.compile(self, optimizer, loss, from_logits)

    def loss_and_gradients(self, x, y, sample_weight=None, **kwargs):
        """``(loss, grads)`` with Keras's loss scaling; grads in
        ``keras_model.trainable_weights`` order."""
        from . import training
        return training.loss_and_gradients(self, x, y, sample_weight, **kwargs)

    def train_on_batch(self, x, y, sample_weight=None):
        """One optimizer step on one batch; returns the loss before the step."""
        from . import training
        return training.train_on_batch(self, x, y, sample_weight)

    def fit(self, x, y=None, **kwargs):
        """Keras-style ``fit(x, y, batch_size, epochs, validation_data, sample_weight,
        shuffle, verbose)``; returns the history dict."""
        from . import training
        return training.fit(self, x, y, **kwargs)

    def evaluate(self, x, y=None, **kwargs):
        """Loss (and accuracy) on ``x, y`` without updating the weights."""
        from . import training
        return training.evaluate(self, x, y, **kwargs)

    def get_weights(self):
        """Copies of the trainable weights, in Keras's ``trainable_weights`` order."""
        from . import training
        return training.get_weights(self)

    def set_weights(self, weights):
        """Write weights given in Keras's ``trainable_weights`` order."""
        from . import training
        return training.set_weights(self, weights)

    @property
    def trainable_weights(self):
        """Read-only views of the weight arrays, in Keras's ``trainable_weights``
        order (see ``fastseq.training.trainable_weights``; change weights with
        ``set_weights``)."""
        from . import training
        return training.trainable_weights(self)

    def to_keras(self, keras_model):
        """Write this model's weights into ``keras_model`` (same architecture)."""
        from . import training
        return training.to_keras(self, keras_model)

    def save(self, path, metadata=None):
        """Save as NumPy ``.npz`` weights plus a JSON config (no pickle)."""
        from . import training
        return training.save(self, path, metadata)

    def _table_path(self, x, layers):
        if len(layers) < 2 or type(layers[0]) is not Embedding:
            return False
        rnn = layers[1]
        if type(rnn) not in (LSTM, Bidirectional) or rnn.dtype != layers[0].dtype:
            return False
        if _validate.resolve_device("Model", self.device, x) != "cpu":
            return False
        inner = ([rnn.forward_layer, rnn.backward_layer] if type(rnn) is Bidirectional
                 else [rnn])
        return all(type(r) is LSTM and r.dtype == rnn.dtype for r in inner)

    def _upload(self):
        """Upload the LSTM/Dense weights to the GPU once per weights version (training
        and ``set_weights`` bump ``_weights_version``)."""
        version = getattr(self, "_weights_version", 0)
        if getattr(self, "_uploaded_version", None) == version:
            return
        for layer in self.layers:
            parts = ([layer.forward_layer, layer.backward_layer]
                     if type(layer) is Bidirectional else [layer])
            for part in parts:
                if type(part) in (LSTM, Dense):
                    part.upload()
        self._uploaded_version = version

    def _forward(self, x, layers=None):
        if self.device == "cuda":
            self._upload()
        mask = None
        layers = self.layers if layers is None else layers
        i = 0
        if self._table_path(x, layers):
            # Embedding -> LSTM / Bidirectional(LSTM) on the CPU: projection by lookup
            emb, rnn = layers[0], layers[1]
            version = getattr(self, "_weights_version", 0)
            ids = np.ascontiguousarray(x, dtype=np.int64)
            mask = (ids != 0) if emb.mask_zero else None
            nxt = layers[2] if len(layers) > 2 else None
            if type(rnn) is LSTM and rnn.fuses_with(nxt):
                x = rnn.forward_table(ids, mask, emb, version, dense_layer=nxt)
                i = 3
            elif type(rnn) is Bidirectional and rnn.fuses_with(nxt):
                x = rnn.forward_table_dense(ids, mask, emb, version, nxt)
                i = 3
            else:
                x = rnn.forward_table(ids, mask, emb, version)
                mask = mask if rnn.return_sequences else None
                i = 2
        while i < len(layers):
            layer = layers[i]
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if type(layer) is LSTM and layer.fuses_with(nxt) and layer._dev is None:
                # LSTM -> Dense tagger head: one pass, no [B, T, H] intermediate
                x, mask = layer.forward_dense(x, mask, nxt, self.device,
                                              getattr(self, "_weights_version", 0))
                i += 2
                continue
            x, mask = layer.forward(x, mask, self.device)
            i += 1
        return x

    def _check_input(self, x):
        try:
            x = np.asarray(x)
        except Exception as exc:
            raise TypeError(f"predict: `x` must be an array of numbers, got "
                            f"{type(x).__name__} ({exc})") from None
        shape, first = self.input_shape, self.layers[0]
        tokens = isinstance(first, Embedding)

        def meaning():
            return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
        if x.dtype.kind not in ("iuf" if tokens else "biuf"):
            what = "integer token ids" if tokens else "real numbers"
            raise TypeError(f"predict: `x` must hold {what}, got dtype {x.dtype}")
        if x.ndim != len(shape):
            raise ValueError(f"predict: `x` must be {len(shape)}-D with shape "
                             f"{meaning()}, got shape {x.shape}")
        if x.size == 0:
            raise ValueError(f"predict: `x` must not be empty, got shape {x.shape}")
        if not tokens and shape[-1] is not None and x.shape[-1] != shape[-1]:
            raise ValueError(f"predict: `x` must have shape {meaning()} ({shape[-1]} "
                             f"features on the last axis), got shape {x.shape}")
        if tokens:
            if x.dtype.kind == "f":
                if not np.all(np.isfinite(x)) or np.any(x != np.trunc(x)):
                    raise ValueError("predict: `x` holds token ids for Embedding layer "
                                     f"{first.name!r}; float ids must be whole numbers")
                x = x.astype(np.int64)
            vocab = first.embeddings.shape[0]
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi >= vocab:
                raise ValueError(f"predict: `x` holds token ids outside [0, {vocab}) of "
                                 f"Embedding layer {first.name!r}: min {lo}, max {hi}")
        return x


# --- import -----------------------------------------------------------------------------
def _to_host(a):
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    if hasattr(a, "get"):  # CuPy
        return a.get()
    return a


def from_keras(keras_model, device="auto"):
    """A fastseq ``Model`` holding NumPy copies of ``keras_model``'s weights, whose
    ``predict`` returns what ``keras_model.predict`` returns.  ``device`` ('auto', 'cpu'
    or 'cuda') is passed to the ops.  Raises ValueError/TypeError naming the layer and
    its class for anything outside the supported chain (see the module docstring)."""
    keras = _keras()
    if not isinstance(keras_model, keras.Model):
        raise TypeError(f"from_keras: `keras_model` must be a keras.Model, got "
                        f"{type(keras_model).__name__}")
    _validate.check_device("from_keras", device)
    calls, input_shape = _chain(keras, keras_model)
    if not calls:
        raise ValueError(f"from_keras: model {keras_model.name!r} has no layers")
    layers = [_import_layer(keras, layer, first=i == 0, last=i == len(calls) - 1)
              for i, layer in enumerate(calls)]
    model = Model(layers, input_shape, device=device, name=keras_model.name)
    model._keras_compile = _compile_settings(keras_model)
    model._keras_floatx = keras.config.floatx()    # the dtype Keras's losses compute in
    return model


def _compile_settings(keras_model):
    """The Keras model's compile settings, the defaults of ``Model.compile``: its
    optimizer as a fastseq config dict (or the error that says why it cannot be
    used) and its loss; None when the model was not compiled."""
    from . import optimizers
    kopt = getattr(keras_model, "optimizer", None)
    if kopt is None or not getattr(keras_model, "compiled", False):
        return None
    try:
        opt = optimizers.from_keras(kopt)
        opt = {"class_name": type(opt).__name__, "config": opt.get_config()}
    except (TypeError, ValueError) as exc:
        opt = exc
    return {"optimizer": opt, "loss": getattr(keras_model, "loss", None)}


def _keras():
    try:
        import keras
    except ImportError as exc:
        raise ImportError("fastseq.from_keras needs Keras 3 (pip install 'fastseq[keras]')"
                          ) from exc
    if not keras.__version__.startswith("3."):
        raise ImportError(f"fastseq.from_keras needs Keras 3, found {keras.__version__}")
    return keras


def _describe(layer):
    return f"layer {layer.name!r} ({type(layer).__name__})"


def _chain(keras, model):
    """The layers ``model`` calls, in order, nested models flattened, and the input shape.
    Walks the graph back from the output, so any branching is caught at the layer that
    takes several inputs."""
    from keras.src.backend import get_keras_mask
    from keras.src.models.functional import Functional

    if not isinstance(model, (keras.Sequential, Functional)):
        raise TypeError(f"from_keras: model {model.name!r} ({type(model).__name__}) is a "
                        f"subclassed model; only Sequential and functional models can be "
                        f"imported")
    if not model.layers:
        raise ValueError(f"from_keras: model {model.name!r} has no layers")
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs:
        raise ValueError(f"from_keras: model {model.name!r} is not built; start it with "
                         f"keras.Input(...) or call model.build(input_shape)")
    if len(inputs) != 1:
        raise ValueError(f"from_keras: model {model.name!r} has {len(inputs)} inputs; "
                         f"only single-input chains are supported")
    hist = [t._keras_history for t in outputs]
    first = (hist[0].operation, hist[0].node_index)
    if len(hist) > 1 and any((h.operation, h.node_index, h.tensor_index) != first + (i,)
                             for i, h in enumerate(hist)):
        names = ", ".join(sorted({_describe(h.operation) for h in hist}))
        raise ValueError(f"from_keras: model {model.name!r} has {len(outputs)} outputs "
                         f"({names}); only a single chain of layers is supported")
    calls = []
    tensor = outputs[0]
    while True:
        op, node_index, tensor_index = tensor._keras_history
        if isinstance(op, keras.layers.InputLayer):
            break
        if tensor_index != 0:
            raise ValueError(f"from_keras: the model uses output {tensor_index} of "
                             f"{_describe(op)}; only a chain of single-output layers is "
                             f"supported")
        args = op._inbound_nodes[node_index].arguments
        # Keras passes the input's own mask as the `mask` keyword; any other tensor
        # argument (a second input, an initial state, a mask of its own) is not a chain.
        tensor = args.args[0] if args.args else None
        passed_mask = isinstance(tensor, keras.KerasTensor) and \
            args.kwargs.get("mask") is not None and \
            args.kwargs["mask"] is get_keras_mask(tensor)
        if not isinstance(tensor, keras.KerasTensor) or \
                len(args.keras_tensors) != 1 + passed_mask:
            raise ValueError(f"from_keras: {_describe(op)} takes "
                             f"{len(args.keras_tensors)} input tensors; only a chain of "
                             f"single-input layers is supported")
        if args.kwargs.get("training"):
            raise ValueError(f"from_keras: {_describe(op)} is called with training=True")
        calls.append(op)
    flat = []
    for op in reversed(calls):
        flat.extend(_chain(keras, op)[0] if isinstance(op, keras.Model) else [op])
    return flat, tuple(inputs[0].shape)


def _dtype(layer):
    return np.float64 if layer.compute_dtype == "float64" else np.float32


def _array(keras, value, dtype):
    return np.array(keras.ops.convert_to_numpy(value), dtype=dtype)  # always a copy


def _activation(layer, key, choices):
    name = layer.get_config()[key]
    name = "linear" if name is None else name
    if not isinstance(name, str) or name not in choices:
        raise ValueError(f"from_keras: {_describe(layer)} has {key}={name!r}; supported: "
                         f"{sorted(choices)}")
    return name


def _check_not_quantized(layer):
    if getattr(layer, "quantization_mode", None) is not None:
        raise ValueError(f"from_keras: {_describe(layer)} is quantized "
                         f"({layer.quantization_mode}); only float weights are supported")


def _import_lstm(keras, layer):
    if layer.stateful:
        raise ValueError(f"from_keras: {_describe(layer)} is stateful; not supported")
    if layer.return_state:
        raise ValueError(f"from_keras: {_describe(layer)} has return_state=True; not "
                         f"supported inside a chain")
    dt = _dtype(layer)
    cell = layer.cell
    return LSTM(layer.name, "LSTM", dt, _array(keras, cell.kernel, dt),
                _array(keras, cell.recurrent_kernel, dt),
                _array(keras, cell.bias, dt) if cell.use_bias else None,
                return_sequences=layer.return_sequences, go_backwards=layer.go_backwards,
                zero_output_for_mask=layer.zero_output_for_mask,
                activation=_activation(layer, "activation", LSTM_ACTIVATIONS),
                recurrent_activation=_activation(layer, "recurrent_activation",
                                                 LSTM_ACTIVATIONS),
                dropout=cell.dropout, recurrent_dropout=cell.recurrent_dropout)


def _import_dense(keras, layer, dense_layer, keras_class):
    _check_not_quantized(dense_layer)
    dt = _dtype(layer)
    return Dense(layer.name, keras_class, dt, _array(keras, dense_layer.kernel, dt),
                 _array(keras, dense_layer.bias, dt) if dense_layer.use_bias else None,
                 _activation(dense_layer, "activation",
                             set(DENSE_ACTIVATIONS) | set(NUMPY_ACTIVATIONS)))


def _import_layer(keras, layer, first, last):
    L = keras.layers
    kind = type(layer)
    name, dt = layer.name, _dtype(layer)
    if kind is L.LSTM:
        return _import_lstm(keras, layer)
    if kind is L.Bidirectional:
        fwd, bwd = layer.forward_layer, layer.backward_layer
        for inner in (fwd, bwd):
            if type(inner) is not L.LSTM:
                raise TypeError(f"from_keras: {_describe(layer)} wraps {_describe(inner)}; "
                                f"only Bidirectional(LSTM) is supported")
        if layer.merge_mode is None and not last:
            raise ValueError(f"from_keras: {_describe(layer)} has merge_mode=None (two "
                             f"outputs); supported only as the last layer")
        return Bidirectional(name, "Bidirectional(LSTM)", dt, _import_lstm(keras, fwd),
                             _import_lstm(keras, bwd), layer.merge_mode)
    if kind is L.Dense:
        return _import_dense(keras, layer, layer, "Dense")
    if kind is L.TimeDistributed:
        if type(layer.layer) is not L.Dense:
            raise TypeError(f"from_keras: {_describe(layer)} wraps "
                            f"{_describe(layer.layer)}; only TimeDistributed(Dense) is "
                            f"supported")
        return _import_dense(keras, layer, layer.layer, "TimeDistributed(Dense)")
    if kind is L.Embedding:
        if not first:
            raise ValueError(f"from_keras: {_describe(layer)} is supported only as the "
                             f"first layer of the model")
        _check_not_quantized(layer)
        return Embedding(name, "Embedding", dt, _array(keras, layer.embeddings, dt),
                         layer.mask_zero)
    if kind is L.Masking:
        return Masking(name, "Masking", dt, layer.mask_value)
    if kind in (L.Dropout, L.SpatialDropout1D, L.GaussianNoise, L.GaussianDropout,
                L.AlphaDropout, L.Identity):
        return Identity(name, kind.__name__, dt)
    if kind is L.Activation:
        return Activation(name, "Activation", dt,
                          _activation(layer, "activation", NUMPY_ACTIVATIONS))
    if kind is L.Softmax:
        return Softmax(name, "Softmax", dt, layer.axis)
    raise TypeError(
        f"from_keras: {_describe(layer)} is not supported; supported layers: InputLayer, "
        f"Embedding, Masking, LSTM, Bidirectional(LSTM), Dense, TimeDistributed(Dense), "
        f"Dropout, SpatialDropout1D, GaussianNoise, GaussianDropout, AlphaDropout, "
        f"Identity, Activation, Softmax")
