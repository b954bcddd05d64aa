"""``python -m fused_lora bench --paths`` (fused_lora/bench/paths.py): every kernel path timed at each M it can take,
the path actually forced, and the thresholds the times suggest."""

import pytest
import torch

from fused_lora.bench import paths
from fused_lora.bench.command import main
from fused_lora.bench.schema import ResultsFile, validate_results

ENV = {"device": "cpu", "torch": torch.__version__, "triton": None, "cuda": None, "commit": "test"}


def _rows(times: dict, K=4096, N=14336, pass_name="fwd_bwd"):
    """Rows from {(path, M): ms}."""
    return [{"bench": "qlora_paths", "impl": f"fused-{path}", "pass": pass_name, "M": M, "K": K, "N": N,
             "median_ms": ms} for (path, M), ms in times.items()]


def test_decode_threshold_is_the_last_m_of_an_unbroken_run_of_decode_wins():
    times = {("decode", 1): 1.0, ("middle", 1): 2.0, ("decode", 16): 1.0, ("middle", 16): 1.5,
             ("decode", 32): 2.0, ("middle", 32): 1.9, ("decode", 64): 1.0, ("middle", 64): 3.0}
    assert paths.suggest_thresholds(_rows(times))["decode_max_m"] == 16  # 64 wins again, after a loss at 32
    times[("decode", 1)] = 3.0
    assert paths.suggest_thresholds(_rows(times))["decode_max_m"] == 0  # decode loses at once


def test_large_threshold_is_where_large_wins_at_every_larger_m():
    times = {("middle", 256): 1.0, ("large", 256): 2.0, ("middle", 512): 2.0, ("large", 512): 1.9,
             ("middle", 1024): 4.0, ("large", 1024): 4.5, ("middle", 2048): 8.0, ("large", 2048): 7.0,
             ("middle", 4096): 16.0, ("large", 4096): 14.0}
    assert paths.suggest_thresholds(_rows(times))["large_min_m"] == 2048  # 512 wins, but 1024 does not
    times[("large", 4096)] = 20.0
    assert paths.suggest_thresholds(_rows(times))["large_min_m"] is None  # large loses at the largest M


def test_a_margin_gives_large_the_m_where_it_is_nearly_as_fast_and_a_spill_breaks_a_run():
    """The offline suggestion (offline_paths.py): with large_margin the large path takes an M where it is within
    that fraction of the middle path's time at every larger M; a path with an infinite time (a launched config that
    spills) never wins."""
    times = {("middle", 1024): 1.0, ("large", 1024): 1.2, ("middle", 2048): 2.0, ("large", 2048): 2.15,
             ("middle", 4096): 4.0, ("large", 4096): 4.1}
    assert paths.suggest_thresholds(_rows(times))["large_min_m"] is None  # middle faster everywhere
    assert paths.suggest_thresholds(_rows(times), large_margin=0.05)["large_min_m"] == 4096
    assert paths.suggest_thresholds(_rows(times), large_margin=0.10)["large_min_m"] == 2048
    inf = float("inf")
    times = {("decode", 16): 1.0, ("middle", 16): 2.0, ("decode", 32): 1.0, ("middle", 32): 2.0,
             ("decode", 64): inf, ("middle", 64): 2.0, ("middle", 4096): inf, ("large", 4096): 9.0}
    suggested = paths.suggest_thresholds(_rows(times), large_margin=0.10)
    assert (suggested["decode_max_m"], suggested["large_min_m"]) == (32, 4096)
    times.update({("middle", 64): inf, ("large", 4096): inf})  # both ineligible: neither challenger wins
    suggested = paths.suggest_thresholds(_rows(times), large_margin=0.10)
    assert (suggested["decode_max_m"], suggested["large_min_m"]) == (32, None)


def test_several_shapes_take_the_change_that_is_right_for_every_one():
    a = {("decode", 16): 1.0, ("middle", 16): 2.0, ("decode", 32): 1.0, ("middle", 32): 2.0,
         ("middle", 1024): 2.0, ("large", 1024): 1.0}
    b = {("decode", 16): 1.0, ("middle", 16): 2.0, ("decode", 32): 3.0, ("middle", 32): 2.0,
         ("middle", 1024): 1.0, ("large", 1024): 2.0, ("middle", 2048): 2.0, ("large", 2048): 1.0}
    fwd_only = {("decode", 16): 9.0, ("middle", 16): 1.0}  # fwd rows are not what the suggestion reads
    suggested = paths.suggest_thresholds(_rows(a) + _rows(b, N=4096) + _rows(fwd_only, pass_name="fwd"))
    assert suggested["per_shape"] == {"4096x14336": {"decode_max_m": 32, "large_min_m": 1024},
                                      "4096x4096": {"decode_max_m": 16, "large_min_m": 2048}}
    assert (suggested["decode_max_m"], suggested["large_min_m"]) == (16, 2048)
    assert paths.suggest_thresholds([]) == {}


class _OneCallTimer:
    """Runs each case once and returns a time by the path that ran (set by the strategy spy)."""

    def __init__(self, ran):
        self.ran = ran

    def median_ms(self, fn, grad_to_none=None):
        self.ran.clear()
        fn()
        return {"decode": 1.0, "middle": 2.0, "large": 3.0}[self.ran[-1]]


def test_each_path_is_forced_and_timed_where_it_can_run(monkeypatch, interpret_triton):
    """Decode only up to M = 64; the path the launcher took is the one forced (strategy.path spied); the rows follow
    the results schema and the suggestion is stored beside the GPU family's current values."""
    from fused_lora.kernels import strategy

    ran = []
    real_path = strategy.path
    monkeypatch.setattr(strategy, "path", lambda *a: ran.append(real_path(*a)) or ran[-1])
    results = ResultsFile(None, ENV, {})
    paths.run_path_bench(((64, 96),), (1, 80), (4,), torch.device("cpu"), _OneCallTimer(ran), results,
                         float("inf"), 2**20)
    validate_results(results.data)
    got = {(row["impl"], row["M"], row["pass"]): row["median_ms"] for row in results.data["results"]}
    expected_paths = {1: ("decode", "middle", "large"), 80: ("middle", "large")}
    assert set(got) == {(f"fused-{p}", M, pass_name) for M, ps in expected_paths.items() for p in ps
                        for pass_name in ("fwd", "fwd_bwd")}
    assert all(ms == {"decode": 1.0, "middle": 2.0, "large": 3.0}[impl.removeprefix("fused-")]
               for (impl, _, _), ms in got.items())
    suggested = results.data["suggested_thresholds"]
    assert (suggested["decode_max_m"], suggested["large_min_m"]) == (1, None)
    assert suggested["current"] == {"decode_max_m": 16, "large_min_m": 512}
    assert "**1**" in paths.path_table(results.data) and "decode_max_m = 1" in paths.path_table(results.data)


def test_the_command_refuses_what_paths_does_not_take(capsys):
    with pytest.raises(SystemExit):
        main(["--paths", "--impls", "fused"])
    assert "--impls applies only without --paths" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--cpu", "--paths"])
    assert "--paths applies only without --cpu" in capsys.readouterr().err
