"""fastseq: Keras-exact LSTM sequence kernels (Numba CPU and CUDA).

>>> import fastseq
>>> y = fastseq.lstm(x, kernel, recurrent_kernel, bias, return_sequences=True)
>>> probs = fastseq.dense(y, dense_kernel, dense_bias, activation="softmax")
>>> model = fastseq.from_keras(keras_model); model.predict(x)
"""
__version__ = "0.1.0"

from .ops import lstm, dense
from ._threads import set_num_threads, get_num_threads


def __getattr__(name):
    # from_keras / Model import lazily: importing fastseq never needs Keras.
    if name in ("from_keras", "Model"):
        from . import keras_import
        return getattr(keras_import, name)
    if name == "load_model":
        from . import training
        return training.load
    raise AttributeError(f"module 'fastseq' has no attribute {name!r}")


__all__ = ["lstm", "dense", "from_keras", "Model", "load_model", "set_num_threads",
           "get_num_threads", "__version__"]
