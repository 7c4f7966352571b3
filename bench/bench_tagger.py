"""Config C4: the UD English EWT test set (length-sorted batches of 32) through
Embedding -> Bidirectional(LSTM) -> TimeDistributed(Dense(17, softmax)), every provider.
extra_info holds sentences/second and tag agreement with Keras.  See bench/conftest.py."""
import pytest

from fastseq.benchmark import PROVIDERS


@pytest.mark.parametrize("provider", PROVIDERS)
def test_ewt_bilstm_tagger(bench_case, provider):
    cmp = bench_case(provider, "C4")
    assert cmp["argmax_agreement"] > 0.999
