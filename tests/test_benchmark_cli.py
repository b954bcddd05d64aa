"""The benchmark tooling on a CPU: the sweep writes schema-valid JSON, --report renders tables, verdicts and plots,
and the end-to-end QLoRA bench runs PEFT+bitsandbytes and the patched model on a tiny Llama."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fused_lora.bench import command, environment, sweep, timing
from fused_lora.bench import impls as bench_impls
from fused_lora.bench.command import main
from fused_lora.bench.impls import LLAMA3_8B_SHAPES, lora_layer_flops
from fused_lora.bench.report import target_checks
from fused_lora.bench.schema import ResultsFile, validate_results

# ------------------------------------------------------------------------------------------------ FLOPs and schema


def test_lora_layer_flops_matches_the_written_formula():
    M, K, N, r = 37, 129, 200, 8
    forward = 2 * M * N * K + 2 * M * r * (K + N)
    backward = 2 * M * N * K + 2 * M * N * r + 2 * M * r * K + 2 * M * r * K + 2 * M * N * r  # dx, v, v·A, dA, dB
    assert lora_layer_flops(M, K, N, r, "fwd") == forward
    assert lora_layer_flops(M, K, N, r, "fwd_bwd") == forward + backward
    with pytest.raises(ValueError, match="unknown pass"):
        lora_layer_flops(M, K, N, r, "bwd")


def _row(**overrides):
    row = {"bench": "qlora_linear", "impl": "fused", "pass": "fwd_bwd", "M": 8192, "K": 4096, "N": 14336, "r": 16,
           "dtype": "bfloat16", "median_ms": 1.0, "tflops": 100.0, "peak_mem_mb": 10.0}
    row.update(overrides)
    return row


ENV = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "commit": "abc"}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"results": [{k: v for k, v in _row().items() if k != "tflops"}]}, "lacks"),
        ({"results": [_row(median_ms=float("nan"))]}, "median_ms"),
        ({"results": [_row(median_ms=0.0)]}, "positive"),
        ({"results": [_row(M=8192.0)]}, "must be an int"),
        ({"results": [_row(M=True)]}, "must be an int"),
        ({"results": [_row(impl=None)]}, "must be a string"),
        ({"env": {"device": "x"}, "results": []}, "env must have"),
        ({"env": {"device": "x", "torch": "2", "host": "y"}, "results": []}, "env must have"),
        ({"env": {**ENV, "host": "y"}, "results": []}, "env must have exactly"),
        ({"env": {**ENV, "commit": None}, "results": []}, "must be strings"),
    ],
    ids=["missing-key", "nan-time", "zero-time", "float-M", "bool-M", "null-impl", "short-env",
         "short-env-with-extra-key", "env-with-extra-key", "null-commit"],
)
def test_validate_results_rejects_malformed_data(bad, message):
    data = {"env": ENV, **bad}
    with pytest.raises(ValueError, match=message):
        validate_results(data)


def test_results_file_is_strict_json_and_keeps_rows_that_break_the_schema_out(tmp_path):
    path = tmp_path / "20260102-1200.json"
    results = ResultsFile(path, ENV, {"quick": True})
    results.add(_row(rel_err=float("inf"), losses=[1.0, float("nan")]))
    results.add(_row(impl="broken", median_ms=float("nan")))
    text = path.read_text()
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the results file: not strict JSON"))
    validate_results(data)
    assert [row["impl"] for row in data["results"]] == ["fused"]
    assert data["results"][0]["rel_err"] == "inf" and data["results"][0]["losses"] == [1.0, "nan"]
    assert data["skipped"][0]["impl"] == "broken" and "median_ms" in data["skipped"][0]["reason"]
    with pytest.raises(ValueError, match="env must have exactly"):
        ResultsFile(tmp_path / "other.json", {**ENV, "host": "x"}, {})


def _git(cwd, *args) -> str:
    command = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com", *args]
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_commit_of_a_copy_without_git_comes_from_fused_lora_commit(tmp_path, monkeypatch):
    """The GPU machine gets the tree without .git, possibly inside another repository: never record its HEAD."""
    outer = tmp_path / "outer"
    copy = outer / "copy"
    copy.mkdir(parents=True)
    _git(outer, "init", "-q")
    _git(outer, "commit", "-q", "--allow-empty", "-m", "outer")
    monkeypatch.setattr(environment, "source_checkout", lambda: copy)
    monkeypatch.setenv("FUSED_LORA_COMMIT", "0123abc")
    assert environment.git_commit() == "0123abc"
    monkeypatch.delenv("FUSED_LORA_COMMIT")
    assert environment.git_commit() == "unknown"
    monkeypatch.setattr(environment, "source_checkout", lambda: outer)
    assert environment.git_commit() == _git(outer, "rev-parse", "HEAD")


# ------------------------------------------------------------------------------------------------ implementations


NEEDS = {"dequant_cublas": ("bitsandbytes",), "peft_bnb": ("bitsandbytes", "peft"), "fused": ("triton",)}


def test_input_sets_are_sized_from_the_l2_cache_and_repeatable():
    import torch

    M, K, N = 37, 129, 200
    pair_bytes = (M * K + M * N) * 4
    for l2_bytes, count in ((pair_bytes, 4), (pair_bytes // 10, 2), (100 * pair_bytes, 8)):
        xs, gs = bench_impls.make_input_sets(M, K, N, torch.float32, "cpu", l2_bytes=l2_bytes)
        assert len(xs) == len(gs) == count
        assert [tuple(x.shape) for x in xs] == [(M, K)] * count and [tuple(g.shape) for g in gs] == [(M, N)] * count
        assert all(x.requires_grad for x in xs) and len({x.sum().item() for x in xs}) == count  # distinct sets
    again, _ = bench_impls.make_input_sets(M, K, N, torch.float32, "cpu", l2_bytes=100 * pair_bytes)
    assert all(torch.equal(a, b) for a, b in zip(xs, again))  # same M, same inputs: every impl sees them


@pytest.mark.parametrize("pass_name", ["fwd", "fwd_bwd"])
def test_timed_pass_rotates_through_every_input_set_with_its_own_gradient(pass_name):
    import torch

    M, K, N = 37, 129, 200
    xs, gs = bench_impls.make_input_sets(M, K, N, torch.float32, "cpu", l2_bytes=M * (K + N))
    W = torch.randn(N, K, dtype=torch.float32)
    seen = []

    def layer(x):
        seen.append(x)
        return x @ W.t()

    run = bench_impls.pass_callable(layer, xs, gs, pass_name)
    for _ in range(2 * len(xs)):
        run()
    assert len(xs) >= 2 and [id(x) for x in seen] == [id(x) for x in xs] * 2
    for x, g in zip(xs, gs):
        if pass_name == "fwd":
            assert x.grad is None
        else:  # each x_i got backward(g_i), twice
            torch.testing.assert_close(x.grad, 2 * g @ W)
    with pytest.raises(ValueError, match="unknown pass"):
        bench_impls.pass_callable(layer, xs, gs, "bwd")


# (device, compute dtype, M, K, N, r): fp32 on the CPU (fused through the Triton interpreter, so tiny), bf16 at a
# ragged Llama-width shape on a GPU.
LAYER_CASES = [
    pytest.param("cpu", "float32", 17, 37, 29, 4, id="cpu-fp32-M17-K37-N29-r4"),
    pytest.param("cuda", "bfloat16", 257, 4096, 1000, 16, id="cuda-bf16-M257-K4096-N1000-r16", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("device, dtype_name, M, K, N, r", LAYER_CASES)
@pytest.mark.parametrize("impl", ["fused", "dequant_cublas", "peft_bnb", "compiled_reference", "dense_cublas"])
def test_each_benchmarked_implementation_computes_the_layer_and_its_gradients(impl, device, dtype_name, M, K, N, r):
    """The sweep's layers against the float64 reference: y, dx and (all but the dense roofline) dA and dB.

    fp32 on the CPU must agree to 1e-5; bf16 on a GPU follows the tolerance rule against plain PyTorch in bf16.
    """
    for module in NEEDS.get(impl, ()):
        pytest.importorskip(module)
    import torch

    from fused_lora.reference import lora_linear_naive
    from fused_lora.testing import assert_close_to_reference, relative_error

    dtype = getattr(torch, dtype_name)
    W, nf4, W_deq = bench_impls.make_base_weight(K, N, dtype, torch.device(device))
    A, B = bench_impls.make_adapters(K, N, r, dtype, torch.device(device))
    weights = {"W": W, "W_deq": W_deq, "nf4": nf4, "A": A, "B": B}
    layer, params = bench_impls.ImplBuilder("aot_eager").build(impl, weights)
    assert len(params) == (0 if impl == "dense_cublas" else 2)  # every LoRA implementation trains A and B
    xs, gs = bench_impls.make_input_sets(M, K, N, dtype, device)
    x, g = xs[0], gs[0]
    layer(x).backward(g)

    def layer_and_grads(x_in, W_in, A_in, B_in, g_in):
        x_in, A_in, B_in = (t.detach().clone().requires_grad_(True) for t in (x_in, A_in, B_in))
        if impl == "dense_cublas":  # the roofline: x·Wᵀ on the unquantized W, no LoRA
            y = torch.nn.functional.linear(x_in, W_in)
        else:
            y = lora_linear_naive(x_in, W_in, A_in, B_in, bench_impls.LORA_SCALING)
        y.backward(g_in)
        return y.detach(), x_in.grad, A_in.grad, B_in.grad

    base = W if impl == "dense_cublas" else W_deq
    ref = layer_and_grads(x.double(), base.double(), A.double(), B.double(), g.double())
    plain = layer_and_grads(x, base, A, B, g)
    with torch.no_grad():
        y = layer(x)
    outputs = [("y", y), ("dx", x.grad)] + list(zip(("dA", "dB"), (p.grad for p in params)))
    for (name, out), plain_t, ref_t in zip(outputs, plain, ref):
        assert out is not None, f"{impl} computed no {name}"
        if device == "cpu":
            assert relative_error(out, ref_t) < 1e-5, name
        else:
            assert_close_to_reference(f"{impl} {name}", out, plain_t, ref_t, dtype)


@pytest.mark.gpu
def test_cuda_timer_reports_the_median_and_the_peak_memory_of_one_call_alone():
    import torch

    timer = timing.CudaTimer(5, 20)
    resident = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")  # allocated before the call: not counted
    assert timer.peak_mem_mb(lambda: torch.empty(32 * 2**20, dtype=torch.uint8, device="cuda")) == 32
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    once = timer.median_ms(lambda: x @ x)
    twice = timer.median_ms(lambda: (x @ x, x @ x))
    assert 1.5 < twice / once < 2.5
    del resident


@pytest.mark.gpu
def test_roofline_measurements_are_plausible():
    import torch

    peak_tflops = timing.measure_bf16_peak_tflops(torch.device("cuda"))
    copy_gbps = timing.measure_copy_gbps(torch.device("cuda"))
    assert 20 < peak_tflops < 5000 and 100 < copy_gbps < 30000


# ------------------------------------------------------------------------------------------------ the CPU sweep


def test_cpu_sweep_writes_schema_valid_results(tmp_path, capsys):
    argv = ["--quick", "--shapes", "37x29,64x48", "--m", "5,17", "--r", "4", "--compile-backend", "aot_eager",
            "--output", str(tmp_path), "--no-optim", "--no-e2e", "--device", "cpu"]
    assert main(argv) == 0
    files = list((tmp_path / "cpu").glob("*.json"))
    assert len(files) == 1 and files[0].stem[:8].isdigit()
    data = json.loads(files[0].read_text())
    validate_results(data)
    assert set(data["env"]) >= {"device", "torch", "triton", "cuda", "commit"}
    assert data["skipped"] == []

    layer_rows = [row for row in data["results"] if row["bench"] == "qlora_linear"]
    cases = {(row["impl"], row["pass"], row["M"], row["K"], row["N"]) for row in layer_rows}
    expected = {(impl, p, M, K, N) for impl in ("reference", "compiled_reference") for p in ("fwd", "fwd_bwd")
                for M in (5, 17) for K, N in ((37, 29), (64, 48))}
    assert cases == expected and len(layer_rows) == len(expected)
    for row in layer_rows:
        assert row["dtype"] == "float32" and row["r"] == 4
        flops = lora_layer_flops(row["M"], row["K"], row["N"], row["r"], row["pass"])
        assert row["flops"] == flops
        assert math.isclose(row["tflops"], flops / (row["median_ms"] * 1e-3) / 1e12, rel_tol=1e-9)
        if row["pass"] == "fwd":  # each implementation's output was checked against the fp32 reference
            assert row["rel_err"] < 1e-5

    dequant = [row for row in data["results"] if row["bench"] == "nf4_dequant"]
    assert {(row["impl"], row["K"], row["N"]) for row in dequant} >= {("fused_lora", 37, 29), ("fused_lora", 64, 48)}
    assert all(row["gbps"] > 0 for row in dequant)

    printed = capsys.readouterr().out
    assert "reference / compiled_reference" in printed and str(files[0]) in printed


def test_unknown_implementation_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown implementation"):
        main(["--impls", "reference,cutlass", "--output", str(tmp_path), "--device", "cpu"])


def test_a_stage_starts_only_with_the_time_it_needs_left(tmp_path):
    import time

    results = ResultsFile(tmp_path / "20260102-1200.json", ENV, {})
    ran = []
    deadline = time.monotonic() + 30
    sweep.run_stage("e2e_qlora_step", 90.0, deadline, results, lambda: ran.append("e2e"))
    sweep.run_stage("optimizer", 15.0, deadline, results, lambda: ran.append("optimizer"))
    assert ran == ["optimizer"]
    assert [entry["bench"] for entry in results.data["skipped"]] == ["e2e_qlora_step"]
    assert "needs about 90 s" in results.data["skipped"][0]["reason"]


def test_later_stages_are_kept_time_on_a_gpu_only_and_the_quick_end_to_end_step_only_if_time_remains():
    """gpu_check.sh's --quick run: the sweep's target cases keep time for the dequantization and optimizer rows
    only; the end-to-end step runs last, when its 90 s are left. The full run keeps time for all three."""
    args = command.build_parser().parse_args(["--quick"])
    assert sweep.later_stage_seconds(args, on_cuda=True) == {"nf4_dequant": 10.0, "optimizer": 15.0}
    assert sweep.stage_seconds(args) == {"nf4_dequant": 10.0, "optimizer": 15.0, "e2e_qlora_step": 90.0}
    assert list(sweep.stage_seconds(args))[-1] == "e2e_qlora_step", "the optional stage runs last"
    args = command.build_parser().parse_args([])
    assert sweep.later_stage_seconds(args, on_cuda=True) == {"nf4_dequant": 30.0, "optimizer": 60.0,
                                                             "e2e_qlora_step": 240.0}
    args = command.build_parser().parse_args(["--quick", "--no-e2e", "--no-dequant"])
    assert sweep.later_stage_seconds(args, on_cuda=True) == {"optimizer": 15.0}
    assert sweep.later_stage_seconds(args, on_cuda=False) == {}


def test_results_go_where_output_says_on_a_gpu_to_bench_results_if_present_and_nowhere_on_a_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert command.results_root(tmp_path / "mine", on_cuda=False) == tmp_path / "mine"
    assert command.results_root(tmp_path / "mine", on_cuda=True) == tmp_path / "mine"
    assert command.results_root(None, on_cuda=True) is None  # no ./bench/results here
    (tmp_path / "bench" / "results").mkdir(parents=True)
    assert command.results_root(None, on_cuda=True) == Path("bench") / "results"
    assert command.results_root(None, on_cuda=False) is None  # a CPU run writes nothing unless asked


def _snapshot(root: Path) -> dict:
    """{relative path: (size, mtime)} of every file under root except git's own and bytecode caches."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in root.rglob("*")
        if path.is_file() and ".git" not in path.parts and "__pycache__" not in path.parts
    }


def test_bench_quick_on_a_cpu_without_output_leaves_the_checkout_unchanged(tmp_path):
    """`python -m fused_lora bench --quick` run from a checkout's root (which has bench/results/) on a CPU prints its
    tables and writes no file: git status stays clean. It runs in a committed copy of the checkout, so that other
    edits of the working tree cannot disturb the comparison; small shapes and aot_eager keep it short."""
    source = Path(__file__).resolve().parents[1]
    if not (source / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout and git")
    listed = _git(source, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    checkout = tmp_path / "checkout"
    for name in filter(None, listed):
        if (source / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, checkout / name)
    assert (checkout / "bench" / "results").is_dir()
    _git(checkout, "init", "-q")
    _git(checkout, "add", "-A")
    _git(checkout, "commit", "-q", "-m", "copy")
    before = _snapshot(checkout)

    argv = ["--quick", "--shapes", "37x29", "--m", "5", "--r", "4", "--compile-backend", "aot_eager",
            "--device", "cpu"]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("FUSED_LORA_BACKEND", None)
    result = subprocess.run([sys.executable, "-m", "fused_lora", "bench", *argv], cwd=checkout, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "reference / compiled_reference" in result.stdout  # the table is printed
    assert "no results file written" in result.stdout
    assert _git(checkout, "status", "--porcelain", "--untracked-files=all", "--ignored") == ""
    assert _snapshot(checkout) == before


def test_a_spent_time_budget_skips_every_case_with_its_reason(tmp_path):
    argv = ["--shapes", "37x29", "--m", "5", "--r", "4", "--output", str(tmp_path), "--no-optim", "--device", "cpu",
            "--max-seconds", "0"]
    assert main(argv) == 0
    data = json.loads(next((tmp_path / "cpu").glob("*.json")).read_text())
    validate_results(data)
    assert data["results"] == []
    budget_skips = {(entry["bench"], entry.get("impl"), entry.get("pass")) for entry in data["skipped"]
                    if "time budget" in entry["reason"]}
    expected = {("qlora_linear", impl, p) for impl in ("reference", "compiled_reference") for p in ("fwd", "fwd_bwd")}
    expected |= {("nf4_dequant", "fused_lora", "fwd"), ("e2e_qlora_step", None, None)}
    assert expected <= budget_skips


# ------------------------------------------------------------------------------------------------ --report


def _synthetic_gpu_results(fused_over_dense=1.1, peft_over_fused=2.0, dequant_over_fused=1.1, with_fused=True):
    """GPU-like rows: every impl on the 8B shapes at M 2048 and 8192, r=16, both passes, plus e2e rows."""
    rows = []
    ratios = {"dense_cublas": 1 / fused_over_dense, "fused": 1.0, "dequant_cublas": dequant_over_fused,
              "peft_bnb": peft_over_fused, "compiled_reference": 1.5}
    for K, N in LLAMA3_8B_SHAPES:
        for M in (2048, 8192):
            for p in ("fwd", "fwd_bwd"):
                base_ms = lora_layer_flops(M, K, N, 16, p) / 600e12 * 1e3
                for impl, ratio in ratios.items():
                    if impl == "fused" and not with_fused:
                        continue
                    ms = base_ms * ratio
                    tflops = lora_layer_flops(M, K, N, 16, p) / (ms * 1e-3) / 1e12
                    rows.append(_row(impl=impl, **{"pass": p}, M=M, K=K, N=N, median_ms=ms, tflops=tflops,
                                     peak_mem_mb=100.0, peak_fraction=tflops / 780.0))
    rows.append(_row(bench="nf4_dequant", impl="fused_lora", **{"pass": "fwd"}, M=0, r=0, tflops=None, gbps=2500.0,
                     bw_fraction=0.8))
    e2e = dict(bench="e2e_qlora_step", **{"pass": "train_step"}, M=4096, K=2048, N=8192, tflops=None)
    rows.append(_row(impl="peft_bnb", median_ms=400.0, peak_mem_mb=10000.0, tokens_per_s=10240.0,
                     losses=[12.0, 11.9], **e2e))
    rows.append(_row(impl="fused", median_ms=200.0, peak_mem_mb=7000.0, tokens_per_s=20480.0, losses=[12.0, 11.9],
                     loss_max_rel_diff=1e-3, **e2e))
    return {"env": ENV, "roofline": {"bf16_tflops": 780.0, "copy_gbps": 3000.0}, "results": rows,
            "skipped": [{"bench": "optimizer", "reason": "fused_lora.bench_optim not importable"}]}


def _verdicts(report_text):
    """{target label: verdict} from the targets table of report.md."""
    verdicts = {}
    for line in report_text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells and " / " in cells[0] and ("<=" in cells[0] or ">=" in cells[0]):
            verdicts[cells[0].split(" <=")[0].split(" >=")[0]] = cells[-1]
    return verdicts


def test_report_renders_ratios_verdicts_and_plots_from_the_newest_results(tmp_path, capsys):
    gpu_dir = tmp_path / "nvidia-h100-80gb-hbm3"
    gpu_dir.mkdir()
    (gpu_dir / "20250101-0000.json").write_text(json.dumps(_synthetic_gpu_results(peft_over_fused=1.0)))
    (gpu_dir / "20260102-1200.json").write_text(json.dumps(_synthetic_gpu_results()))
    (gpu_dir / "notes.json").write_text("{}")  # not a results file: must be ignored

    assert main(["--report", str(tmp_path)]) == 0
    report = (gpu_dir / "report.md").read_text()
    assert "20260102-1200.json" in report and capsys.readouterr().out.startswith("# Benchmark report")
    assert _verdicts(report) == {"fused / dense_cublas": "met", "peft_bnb / fused": "met",
                                 "dequant_cublas / fused": "not met"}
    ratios_at = report.index("## qlora_linear ratios")
    assert report.index("## Targets") < ratios_at < report.index("## qlora_linear, every row")
    ratio_line = next(line for line in report[ratios_at:].splitlines()
                      if "| 4096 | 14336 | 8192 | 16 | fwd_bwd" in line)
    assert "| 1.1 | 1.1 | 2 | 1.5 |" in ratio_line  # fused/dense, dequant/fused, peft/fused, compiled/fused
    assert "tokens/s | 2 | ≥ 1.5 | met" in report and "peak memory | 0.7 | ≤ 0.8 | met" in report
    assert "bench_optim not importable" in report

    for name in ("tflops_fwd_r16.png", "tflops_fwd_bwd_r16.png"):
        png = (gpu_dir / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        assert f"]({name})" in report


def test_report_says_not_measured_without_fused_rows(tmp_path):
    path = tmp_path / "20260102-1200.json"
    path.write_text(json.dumps(_synthetic_gpu_results(with_fused=False)))
    assert main(["--report", str(path)]) == 0
    verdicts = _verdicts((tmp_path / "report.md").read_text())
    assert set(verdicts.values()) == {"not measured"} and len(verdicts) == 3


def test_report_leaves_out_a_malformed_row_and_says_so(tmp_path):
    data = _synthetic_gpu_results()
    data["results"].append(_row(bench="paged_adamw", impl="broken", median_ms=float("nan")))
    path = tmp_path / "20260102-1200.json"
    path.write_text(json.dumps(data))
    assert main(["--report", str(path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "Rows left out: they break the results schema (1)" in report and "median_ms must be a finite" in report
    assert _verdicts(report)["fused / dense_cublas"] == "met"


def test_report_without_results_fails_with_a_clear_message(tmp_path, capsys):
    assert main(["--report", str(tmp_path)]) == 1
    assert "no results JSON" in capsys.readouterr().err


def test_target_met_only_on_the_measured_shapes_is_not_called_met():
    data = _synthetic_gpu_results()
    rows = [row for row in data["results"] if (row["K"], row["N"]) != (4096, 1024)]
    verdicts = {c["target"]: c["verdict"] for c in target_checks(rows)}
    assert verdicts["fused / dense_cublas <= 1.15"] == "met on the measured shapes only"


# ------------------------------------------------------------------------------------------------ end to end


def test_e2e_bench_runs_peft_bnb_and_the_patched_model_with_matching_losses():
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from fused_lora.bench.e2e import cpu_config, run_e2e_bench

    config = cpu_config(quick=True)
    rows, skipped = run_e2e_bench(device="cpu", config=config)
    assert skipped == []
    assert [row["impl"] for row in rows] == ["peft_bnb", "fused"]
    validate_results({"env": ENV, "results": rows})
    peft_row, fused_row = rows
    assert fused_row["patched_layers"] == 7 * config.layers
    assert fused_row["trainable_params"] == peft_row["trainable_params"]
    assert len(fused_row["losses"]) == config.steps and all(math.isfinite(v) for v in fused_row["losses"])
    assert fused_row["losses"][0] == pytest.approx(math.log(config.vocab), rel=0.05)  # untrained: ~uniform
    assert fused_row["loss_max_rel_diff"] < 1e-4  # fp32 on CPU: the same math up to rounding
    assert all(row["tokens_per_s"] > 0 and row["M"] == config.batch * config.seq for row in rows)


def test_one_failing_optimizer_is_skipped_and_the_others_keep_their_rows(monkeypatch, tmp_path):
    """run_optimizer_bench: an implementation that fails is recorded under "skipped" with its reason (the sweep passes
    ResultsFile.skip); the rows of the others are kept, ratios taken against what was measured. Without ``skip``
    the error is raised."""
    import torch

    from fused_lora.bench import optimizer

    def broken(params):
        raise RuntimeError("no managed memory here")

    monkeypatch.setattr(optimizer, "_implementations", lambda cuda: {
        "torch_adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4), "paged_adamw_resident": broken})
    skipped = []
    rows = optimizer.run_optimizer_bench(quick=True, device="cpu", skip=lambda what, reason: skipped.append(
        (what["impl"], reason)))
    assert [row["impl"] for row in rows] == ["torch_adamw_fused"] and rows[0]["median_ms"] > 0
    assert skipped == [("paged_adamw_resident", "RuntimeError: no managed memory here")]
    with pytest.raises(RuntimeError, match="no managed memory"):
        optimizer.run_optimizer_bench(quick=True, device="cpu")
    results = ResultsFile(None, ENV, {})
    monkeypatch.setattr(sweep, "run_optimizer_bench", optimizer.run_optimizer_bench)
    sweep.run_optimizer_rows(type("Args", (), {"quick": True})(), "cpu", results)
    assert [row["impl"] for row in results.data["results"]] == ["torch_adamw_fused"]
    assert [entry["impl"] for entry in results.data["skipped"]] == ["paged_adamw_resident"]
