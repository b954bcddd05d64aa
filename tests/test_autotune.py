"""Autotuning the user does not notice (fused_lora/kernels/autotune.py): a small pruned set of configs per M bucket,
winners cached on disk across runs, and a timer that allocates no L2-flush buffer.

Without a GPU the autotuner can be built and asked which configs it would time, but not run: these tests check the
construction (the options triton.autotune receives and keeps), the pruning, and the timer with CUDA events faked.
"""

import inspect

import pytest
import torch
import triton

from fused_lora.kernels import autotune
from fused_lora.kernels.autotune import MAX_CONFIGS_PER_BUCKET, bench_without_flush, gemm_configs, keep_tiles_for_m

BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
KERNELS = {"lora_fwd_kernel": ("BLOCK_N", "BLOCK_K", {}), "lora_dx_kernel": ("BLOCK_K", "BLOCK_N", {"dx_ptr": 0})}


def _kept(capability, kernel, bucket, **constexprs):
    out_name, reduce_name, positional = KERNELS[kernel]
    configs = gemm_configs(capability, out_name, reduce_name)
    return keep_tiles_for_m(configs, {"M_BUCKET": bucket, **positional}, **constexprs)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("capability", [(9, 0), (8, 0)], ids=["sm90", "sm80"])
def test_every_bucket_times_a_few_configs_with_tiles_that_fit_it(capability, kernel):
    for bucket in BUCKETS:
        for lora in (True, False):
            kept = _kept(capability, kernel, bucket, HAS_LORA=lora, IS_NF4=True, ROW_SCALES=True)
            assert 1 <= len(kept) <= MAX_CONFIGS_PER_BUCKET, (bucket, lora, kept)
            rows = [c.kwargs["BLOCK_M"] for c in kept]
            if bucket <= 8:
                assert rows == [16] * len(rows), (bucket, rows)  # decode sizes: no padding rows beyond one tile
            if bucket >= 128:  # training sizes: the 128-row tiles first, where one fits the register rule
                narrow = capability == (8, 0) and kernel == "lora_dx_kernel" and lora
                assert rows[0] == (64 if narrow else 128), (bucket, rows)


def test_the_pruned_sets_are_the_ones_recorded():
    """The sm90 sets per bucket (change deliberately: the offline report prices exactly these)."""
    def tiles(bucket):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
                for c in _kept((9, 0), "lora_fwd_kernel", bucket, HAS_LORA=True, IS_NF4=True, ROW_SCALES=True)]

    assert tiles(1) == [(16, 128, 128, 4, 4), (16, 64, 256, 4, 3)]
    assert tiles(16) == [(16, 128, 128, 4, 4), (16, 64, 256, 4, 3), (32, 128, 128, 4, 4)]
    assert tiles(128) == [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3)]
    # from bucket 256 the NF4 forward times the 256-row tile in place of the third (autotune.TALL_NF4_MIN_BUCKET)
    assert tiles(256) == tiles(8192) == [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3)]
    dense = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in _kept((9, 0), "lora_fwd_kernel", 256, HAS_LORA=True,
                                                                        IS_NF4=False)]
    dx = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in _kept((9, 0), "lora_dx_kernel", 256, HAS_LORA=False,
                                                                     IS_NF4=True, ROW_SCALES=True)]
    assert dense == [(128, 256), (128, 128), (128, 128)] and max(m for m, _ in dx) == 128
    # dx with the low-rank term over an NF4 W: autotune.NF4_DX_TILE (128x64x64, 4 warps) in place of 64x128x64 from
    # bucket 128 on (half the decode per MMA, as many programs), not in bucket 64, whose own 64-row tile comes first;
    # never over a dense W (the slab path at large M, a bf16 base) nor in the forward
    def dx_tiles(bucket, nf4):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"], c.num_warps)
                for c in _kept((9, 0), "lora_dx_kernel", bucket, HAS_LORA=True, IS_NF4=nf4, ROW_SCALES=nf4)]

    assert dx_tiles(64, True) == [(64, 128, 64, 4), (128, 128, 64, 8), (128, 128, 128, 8)]
    assert dx_tiles(128, True) == dx_tiles(256, True) == dx_tiles(8192, True) \
        == [(128, 128, 64, 8), (128, 128, 128, 8), (128, 64, 64, 4)]
    assert dx_tiles(256, False) == [(128, 128, 64, 8), (128, 128, 128, 8), (64, 128, 64, 4)]
    nf4_dx = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}  # the forward's names: 64 output columns, K step 64
    assert not any(c.kwargs.items() >= nf4_dx.items() and c.num_warps == 4
                   for bucket in BUCKETS for nf4 in (True, False)
                   for c in _kept((9, 0), "lora_fwd_kernel", bucket, HAS_LORA=True, IS_NF4=nf4, ROW_SCALES=nf4))


@pytest.mark.parametrize("capability", [(9, 0), (8, 0)], ids=["sm90", "sm80"])
def test_dx_with_lowrank_term_never_tries_tiles_above_128x128(capability):
    """The sm_90 dx tiles 128x256x64 and 256x128x64 need 262144 B of shared memory with the low-rank term (limit
    232448 B)."""
    def tiles(kernel, lora):
        out_name, reduce_name, _ = KERNELS[kernel]
        return [(c.kwargs["BLOCK_M"], c.kwargs[out_name], c.kwargs[reduce_name], c.num_stages)
                for c in _kept(capability, kernel, 8192, HAS_LORA=lora, IS_NF4=True, ROW_SCALES=True)]

    with_lora = tiles("lora_dx_kernel", True)
    assert with_lora and all(bm * bk <= 128 * 128 for bm, bk, _, _ in with_lora), with_lora
    assert (128, 256, 64, 3) in tiles("lora_dx_kernel", False)
    assert (128, 256, 64, 3) in tiles("lora_fwd_kernel", True)


@pytest.mark.parametrize("capability", [(9, 0), (8, 0)], ids=["sm90", "sm80"])
def test_dx_with_lowrank_term_keeps_at_most_64_accumulator_values_per_thread(capability):
    """64x256 with 4 warps (sm_90) and 128x128 with 4 warps (sm_80) hold 128 fp32 accumulator values per thread and
    spill beside the low-rank term (compile report); every bucket keeps tiles of at most 64."""
    for bucket in BUCKETS:
        kept = _kept(capability, "lora_dx_kernel", bucket, HAS_LORA=True, IS_NF4=True, ROW_SCALES=True)
        per_thread = [c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] // (32 * c.num_warps) for c in kept]
        assert kept and max(per_thread) <= autotune.DX_LORA_MAX_ACC_PER_THREAD == 64, (bucket, per_thread)
    without = _kept(capability, "lora_dx_kernel", 64, HAS_LORA=False, IS_NF4=True, ROW_SCALES=True)
    assert any(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] // (32 * c.num_warps) == 128 for c in without), \
        "without the low-rank term the wide tiles stay"


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("capability", [(9, 0), (8, 0)], ids=["sm90", "sm80"])
@pytest.mark.parametrize("bucket", [8, 8192], ids=["M8", "M8192"])
def test_nf4_without_row_scales_runs_single_stage(capability, kernel, bucket):
    """NF4 with K not a multiple of the blocksize gathers a scale per element: at 3-4 stages every config needs
    180-650 KiB of shared memory, at 1 stage 36-80 KiB."""
    def stages(**constexprs):
        return [c.num_stages for c in _kept(capability, kernel, bucket, HAS_LORA=True, **constexprs)]

    assert set(stages(IS_NF4=True, ROW_SCALES=False)) == {1}
    aligned, dense = stages(IS_NF4=True, ROW_SCALES=True), stages(IS_NF4=False, ROW_SCALES=False)
    assert aligned and dense and all(s > 1 for s in aligned + dense), (aligned, dense)


def test_autotuner_is_built_with_the_pruning_the_disk_cache_and_the_flushless_timer(monkeypatch):
    from fused_lora.kernels.lora_fwd import lora_fwd_kernel

    assert "cache_results" in inspect.signature(triton.autotune).parameters  # Triton >= 3.4 (CI 3.9, GPU 3.6)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the Autotuner turns its disk cache off under the interpreter
    tuner = autotune.autotuned.__wrapped__(lora_fwd_kernel, (9, 0), "BLOCK_N", "BLOCK_K")
    assert isinstance(tuner, triton.runtime.autotuner.Autotuner)
    assert tuner.cache_results is True
    assert tuner.do_bench is bench_without_flush
    assert tuner.early_config_prune is keep_tiles_for_m
    assert len(tuner.configs) > MAX_CONFIGS_PER_BUCKET  # the full list; the pruning picks per bucket
    tuner.nargs = {"M_BUCKET": 8192}
    kept = tuner.prune_configs({"HAS_LORA": True, "IS_NF4": True, "ROW_SCALES": True})
    assert len(kept) == MAX_CONFIGS_PER_BUCKET


def test_disk_cache_is_requested_only_where_triton_has_it(monkeypatch):
    assert autotune._disk_cache_option() == {"cache_results": True}

    def old_autotune(configs, key, prune_configs_by=None, reset_to_zero=None, do_bench=None):
        raise AssertionError("not called")

    monkeypatch.setattr(triton, "autotune", old_autotune)
    assert autotune._disk_cache_option() == {}


class _FakeEvent:
    clock = 0.0

    def __init__(self, enable_timing=False):
        self.time = None

    def record(self, stream=None):
        _FakeEvent.clock += 0.25
        self.time = _FakeEvent.clock

    def elapsed_time(self, end):
        return end.time - self.time


def test_timer_allocates_no_flush_buffer_and_returns_the_quantiles(monkeypatch):
    def no_allocation(*args, **kwargs):
        raise AssertionError("bench_without_flush allocated a tensor")

    for name in ("empty", "zeros", "ones", "empty_like", "zeros_like", "full", "randn"):
        monkeypatch.setattr(torch, name, no_allocation)
    monkeypatch.setattr(triton.testing, "do_bench", no_allocation)  # the flushing timer is never used
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    calls = []
    result = bench_without_flush(lambda: calls.append(1), quantiles=(0.5, 0.2, 0.8), budget_ms=1.0, max_reps=20)
    assert len(result) == 3 and all(t > 0 for t in result)
    reps = len(calls) - 2  # one warm-up (compilation) call and one first timed call
    assert 3 <= reps <= 20
    assert bench_without_flush(lambda: None) > 0  # no quantiles: the median


def test_timer_times_a_launch_refused_for_its_resources_as_infinite(monkeypatch):
    """A tile that does not fit beside the pair table's 32 KiB (which Triton does not count) is refused at launch:
    the timer returns infinity for it, as Triton's own OutOfResources, and the autotuner takes another; any other
    launch error is raised."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)

    def refused():
        raise RuntimeError("Triton Error [CUDA]: too many resources requested for launch")

    assert bench_without_flush(refused) == float("inf")
    assert bench_without_flush(refused, quantiles=(0.5, 0.2, 0.8)) == [float("inf")] * 3

    def broken():
        raise RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        bench_without_flush(broken)


def _dx_like(dx_ptr, M_BUCKET, N, K, R_PAD, HAS_LORA, IS_NF4, ROW_SCALES, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M):
    pass


@pytest.fixture
def dx_tuner(monkeypatch, tmp_path):
    """The dx kernel's autotuner for sm_90 with a GPU target faked for its disk-cache key, Triton's cache in a
    folder of the test's own, the candidates of one key and a benchmark that records its calls and times them."""
    import types

    import triton.compiler.compiler as compiler
    import triton.runtime.autotuner as autotuner_module

    from triton.runtime.jit import JITFunction

    from fused_lora import _common

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(autotuner_module, "driver", types.SimpleNamespace(
        active=types.SimpleNamespace(get_current_target=lambda: "sm90")))
    monkeypatch.setattr(compiler, "make_backend", lambda target: types.SimpleNamespace(hash=lambda: "cuda-90"))
    monkeypatch.setattr(_common, "_warned", set())
    # a kernel of the dx kernel's tuning names (the real one is an interpreted function under the test suite's
    # TRITON_INTERPRET=1, whose dependencies Triton's cache key cannot hash)
    tuner = autotune.autotuned.__wrapped__(JITFunction(_dx_like), (9, 0), "BLOCK_K", "BLOCK_N")
    tuner.nargs = {"M_BUCKET": 8192, "dx_ptr": 0}
    configs = tuner.prune_configs({"HAS_LORA": True, "IS_NF4": True, "ROW_SCALES": True})
    key = (8192, 4096, 4096, 16, True, False, True, True, True, "torch.bfloat16")
    benched = []

    def bench():
        benched.append(1)
        tuner.configs_timings = {c: [float(i + 1)] * 3 for i, c in enumerate(configs)}
        tuner.cache[key] = configs[0]

    return tuner, configs, key, bench, benched


def _cache_file(tmp_path):
    return next((tmp_path / "cache").rglob("_dx_like.autotune.json"))


def test_a_good_disk_cache_is_used_without_tuning(dx_tuner, tmp_path):
    tuner, configs, key, bench, benched = dx_tuner
    assert tuner.check_disk_cache(key, configs, bench) is False and benched == [1]  # first run: tuned, written
    tuner.cache.clear()
    assert tuner.check_disk_cache(key, configs, bench) is True and benched == [1]  # next run: read
    assert tuner.cache[key] == configs[0]


@pytest.mark.parametrize("content", ["truncated", "no timings", "no configs", "unknown field", "not a candidate"])
def test_a_bad_disk_cache_costs_one_tuning_and_never_the_step(dx_tuner, tmp_path, content):
    """Triton's own check_disk_cache raised on each of these (JSONDecodeError, KeyError, ValueError, TypeError) or,
    for a readable file naming a config the pruning never offered (a 256-row dx tile: more shared memory than an SM
    has), used it. Now: one warning at most, one tuning, and the winner is a candidate."""
    import json

    tuner, configs, key, bench, benched = dx_tuner
    tuner.check_disk_cache(key, configs, bench)
    path = _cache_file(tmp_path)
    good = path.read_text()
    path.write_text({
        "truncated": good[:50],
        "no timings": json.dumps({"key": list(key)}),
        "no configs": json.dumps({"configs_timings": []}),
        "unknown field": json.dumps({"configs_timings": [[{"kwargs": {}, "colour": 1}, [0.1]]]}),
        "not a candidate": json.dumps({"configs_timings": [[{"kwargs": {"BLOCK_M": 256, "BLOCK_N": 64,
                                                                        "BLOCK_K": 128, "GROUP_M": 8},
                                                             "num_warps": 8, "num_stages": 3}, [0.1, 0.1, 0.1]]]}),
    }[content])
    tuner.cache.clear()
    benched.clear()
    assert tuner.check_disk_cache(key, configs, bench) is False
    assert benched == [1] and tuner.cache[key] in configs


@pytest.mark.parametrize("failure", ["unwritable folder", "disk full"])
def test_a_cache_that_cannot_be_written_tunes_in_memory(dx_tuner, tmp_path, monkeypatch, failure):
    """An unusable cache folder raised before tuning, a full disk after it (the tuning lost with the step)."""
    from triton.runtime.cache import FileCacheManager

    tuner, configs, key, bench, benched = dx_tuner
    if failure == "unwritable folder":
        (tmp_path / "file").write_text("")
        monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "file" / "cache"))  # a folder under a file
    else:
        def full(self, *args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(FileCacheManager, "put", full)
    with pytest.warns(RuntimeWarning, match="autotune disk cache cannot be used"):
        assert tuner.check_disk_cache(key, configs, bench) is False
    assert benched == [1] and tuner.cache[key] == configs[0]


def test_an_error_of_the_tuning_itself_is_raised_once_without_a_cache_warning(dx_tuner):
    """A launch error while timing (an illegal address: the timer raises what is not a refusal for resources) is
    the kernel's, not the disk cache's: raised as it is, after one tuning, with no warning about the cache."""
    import warnings

    tuner, configs, key, _, _ = dx_tuner
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="illegal memory access"):
            tuner.check_disk_cache(key, configs, broken)
    assert calls == [1] and key not in tuner.cache
