"""pytest-benchmark setup for the fastseq benchmarks (``bench/bench_*.py``).

Run::

    python -m pytest bench/ --benchmark-only                  # everything
    python -m pytest bench/bench_lstm.py --benchmark-only -k C2
    python -m pytest bench/ --benchmark-only --fastseq-quick  # tiny sizes (smoke test)
    KERAS_BACKEND=jax python -m pytest bench/ --benchmark-only -k keras-jax

These files are not part of the test run (pyproject's testpaths is tests/); this conftest
collects ``bench_*.py`` when pytest is pointed at this directory.  The models, weights and
inputs come from :mod:`fastseq.benchmark`, the same builders ``fastseq bench`` and the
tests use.  A provider whose package is not installed is skipped as "missing: <pkg>".
Keras runs on the backend this process was started with (KERAS_BACKEND): the "keras" and
"keras-tf-function" providers need TensorFlow, "keras-jax" needs JAX.
"""
import importlib.util
import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

if importlib.util.find_spec("pytest_benchmark") is None:  # pragma: no cover
    collect_ignore_glob = ["bench_*.py"]


def pytest_addoption(parser):
    group = parser.getgroup("fastseq")
    group.addoption("--fastseq-quick", action="store_true",
                    help="benchmark the tiny --quick configurations")
    group.addoption("--fastseq-rounds", type=int, default=5,
                    help="timed rounds per benchmark (default 5)")
    group.addoption("--fastseq-threads", type=int, default=None,
                    help="threads for every provider (default: each framework's own)")


def pytest_collect_file(file_path, parent):
    # Collect bench_*.py when pytest is given this directory; files named on the command
    # line are collected by pytest itself.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    threads = config.getoption("--fastseq-threads", None)
    if threads:
        from fastseq import benchmark
        benchmark.set_threads(threads)


class _Workloads:
    """Workloads, runners and Keras references built once per session."""

    def __init__(self, quick, threads):
        self.quick, self.threads = quick, threads
        self._wl, self._ref, self._runners = {}, {}, {}

    def workload(self, name):
        if name not in self._wl:
            from fastseq import benchmark
            self._wl[name] = benchmark.make_workload(name, quick=self.quick)
        return self._wl[name]

    def runner(self, provider, name):
        """The provider's runner for workload ``name``, or a skip when it cannot run here."""
        from fastseq import benchmark
        missing = benchmark.provider_missing(provider)
        if missing:
            pytest.skip(missing)
        if provider.startswith("keras"):
            import keras
            want = "jax" if provider == "keras-jax" else "tensorflow"
            if keras.backend.backend() != want:
                pytest.skip(f"Keras runs on {keras.backend.backend()} in this process; "
                            f"start pytest with KERAS_BACKEND={want} for {provider}")
        key = (provider, name)
        if key not in self._runners:
            self._runners[key] = benchmark.make_runner(provider, self.workload(name),
                                                       threads=self.threads)
        return self._runners[key]

    def reference(self, name):
        """Keras (this process's backend) predict_on_batch output for workload ``name``."""
        if name not in self._ref:
            from fastseq import benchmark
            self._ref[name] = benchmark._keras_runner(self.workload(name))()
        return self._ref[name]


@pytest.fixture(scope="session")
def workloads(request):
    return _Workloads(request.config.getoption("--fastseq-quick"),
                      request.config.getoption("--fastseq-threads"))


@pytest.fixture(scope="session")
def rounds(request):
    return max(1, request.config.getoption("--fastseq-rounds"))


@pytest.fixture
def bench_case(benchmark, workloads, rounds):
    """``bench_case(provider, config_name)``: the shared body of the benchmarks."""
    return lambda provider, name: _bench_case(benchmark, workloads, rounds, provider, name)


def _bench_case(benchmark, workloads, rounds, provider, name):
    """First call timed apart (compilation/tracing), one warm-up round, ``rounds`` timed
    rounds, output checked against Keras."""
    import time
    from fastseq import benchmark as fb
    run = workloads.runner(provider, name)
    wl = workloads.workload(name)
    t0 = time.perf_counter()
    out = run()
    first_ms = (time.perf_counter() - t0) * 1e3
    cmp = fb.compare_outputs(wl, out, workloads.reference(name))
    benchmark.group = name
    benchmark.name = f"{name}-{provider}"
    benchmark.extra_info.update({
        "config": wl.config.describe(), "provider": provider, "first_call_ms": first_ms,
        "flops": wl.flops, "max_abs_diff_to_keras": cmp["max_abs_diff"],
        "argmax_agreement": cmp["argmax_agreement"], "sentences": wl.n_sentences,
    })
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    stats = benchmark.stats.stats if benchmark.stats is not None else None
    if stats is not None:
        benchmark.extra_info["gflops_at_median"] = wl.flops / stats.median / 1e9
        if wl.kind == "bilstm":
            benchmark.extra_info["sentences_per_s_at_median"] = wl.n_sentences / stats.median
    # Benchmarks and tests agree on the models: every provider matches Keras.
    assert cmp["max_abs_diff"] < 1e-4, cmp
    return cmp
