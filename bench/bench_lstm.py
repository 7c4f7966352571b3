"""Configs C1-C3: LSTM(H, return_sequences=True) -> TimeDistributed(Dense(K, softmax)) on
random input, every provider.  See bench/conftest.py for how to run."""
import pytest

from fastseq.benchmark import PROVIDERS


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("config", ["C1", "C2", "C3"])
def test_lstm_tagger(bench_case, config, provider):
    bench_case(provider, config)
