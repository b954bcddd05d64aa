"""How ``python -m fused_lora bench`` spends a GPU run cut short by --max-seconds (bench/gpu_check.sh's), on the CPU:
the target cases of every shape first, then the dequantization and optimizer rows in the time kept for them, then
the rest of the sweep; and the optimizer rows' peak memory without do_bench's cache-flush buffer."""

import time

import torch

from fused_lora.bench import command, optimizer, sweep
from fused_lora.bench.schema import ResultsFile
from test_benchmark_cli import ENV


def test_a_gpu_run_times_every_shapes_targets_before_the_short_stages_and_the_rest(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep, "run_sweep", lambda args, device, results, deadline, select=None: calls.append(
        ("sweep", deadline, select)))
    monkeypatch.setattr(sweep, "run_dequant_bench", lambda args, device, results, deadline: calls.append(
        ("dequant", deadline, None)))
    monkeypatch.setattr(sweep, "run_optimizer_rows", lambda args, device, results: calls.append(("optim", 0, None)))
    monkeypatch.setattr(sweep, "run_e2e_rows", lambda args, device, results: calls.append(("e2e", 0, None)))
    args = command.build_parser().parse_args(["--quick"])
    sweep.apply_defaults(args, on_cuda=True)
    results = ResultsFile(tmp_path / "20260102-1200.json", ENV, {})
    deadline = time.monotonic() + 60  # the optimizer's 15 s are left at its turn, the end-to-end step's 90 s not
    sweep._run_stages(args, torch.device("cuda"), results, deadline)
    assert [c[0] for c in calls] == ["sweep", "dequant", "optim", "sweep"]  # e2e: its 90 s are not left
    (_, targets_deadline, targets), (_, dequant_deadline, _), _, (_, rest_deadline, rest) = calls
    assert targets_deadline == deadline - 10 - 15 - sweep.CASE_OVERRUN_S and dequant_deadline == deadline - 15
    assert rest_deadline == deadline
    cases = [(M, r, impl, p) for M in args.m for r in args.ranks for impl in args.impls for p in ("fwd", "fwd_bwd")]
    chosen = [c for c in cases if targets(*c)]
    assert {c[2] for c in chosen} == {"fused", "dense_cublas", "dequant_cublas", "peft_bnb"}
    assert {(c[0], c[1], c[3]) for c in chosen} == {(8192, 16, "fwd_bwd")}
    assert sorted(c for c in cases if rest(*c)) == sorted(c for c in cases if c not in chosen)
    assert [e["bench"] for e in results.data["skipped"]] == ["e2e_qlora_step"]


def test_a_selected_sweep_times_the_selected_cases_only(tmp_path):
    args = command.build_parser().parse_args(["--shapes", "64x48", "--m", "3,5", "--r", "4", "--impls", "reference"])
    sweep.apply_defaults(args, on_cuda=False)
    results = ResultsFile(tmp_path / "20260102-1200.json", ENV, {})
    sweep.run_sweep(args, torch.device("cpu"), results, time.monotonic() + 600,
                    select=lambda M, r, impl, pass_name: M == 5 and pass_name == "fwd_bwd")
    assert [(row["M"], row["pass"]) for row in results.data["results"]] == [(5, "fwd_bwd")]
    assert results.data["skipped"] == []


def test_optimizer_peak_memory_is_one_steps_not_do_benchs(monkeypatch):
    """do_bench allocates a 256 MiB cache-flush buffer: measured around it, every optimizer row read 256 MiB more."""
    allocated, peak = [0], [0]
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: peak.__setitem__(0, allocated[0]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: allocated[0])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: peak[0])

    def do_bench_like(fn, cuda):
        peak[0] = max(peak[0], allocated[0] + 256 * 2**20)  # the flush buffer
        fn()
        return 1.0

    monkeypatch.setattr(optimizer, "_time_ms", do_bench_like)
    median_ms, peak_mb, _ = optimizer._measure(lambda ps: torch.optim.SGD(ps, lr=0.1), 2, 8, 8, "cpu", cuda=True)
    assert median_ms == 1.0 and peak_mb < 1
