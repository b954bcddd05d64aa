"""``python -m fused_lora bench --cpu`` (fused_lora/bench/cpu.py) on a tiny configuration: every bench runs both
sides, prints its ratio, says the first call once, and writes a results JSON only when given an output folder."""

import json
from pathlib import Path

import pytest
import torch

from fused_lora.bench import command
from fused_lora.bench import cpu as cpu_bench
from fused_lora.bench.schema import validate_results

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
pytest.importorskip("transformers")


def test_interleaved_medians_alternate_the_implementations():
    order = []
    medians = cpu_bench.interleaved_medians({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                            reps=3, warmup=1)
    assert order == ["a", "b"] * 4
    assert set(medians) == {"a", "b"} and all(len(samples) == 3 for _, samples in medians.values())


def test_tiny_cpu_bench_writes_rows_and_ratios(tmp_path, capsys):
    threads = torch.get_num_threads()
    rows, path = cpu_bench.run_cpu_bench(cpu_bench.TINY_CONFIG, results_root=tmp_path, threads=1)
    assert torch.get_num_threads() == threads, "the thread count is restored"
    out = capsys.readouterr().out
    assert path is not None and path.parent == tmp_path / "cpu" and path.exists()
    data = json.loads(path.read_text())
    validate_results(data)
    assert not data["skipped"], data["skipped"]
    got = {(row["bench"], row["impl"], row["dtype"]) for row in data["results"]}
    assert got == {(bench, impl, dtype) for bench in cpu_bench.BENCHES for impl in ("peft_bnb", "fused")
                   for dtype in ("float32", "bfloat16")}
    for row in data["results"]:
        if row["impl"] == "fused":
            assert row["ratio_vs_peft_bnb"] > 0 and row["first_call_ms"] > 0
        else:  # the fused call's first-call time was recorded on the peer's row too
            assert "first_call_ms" not in row
        assert len(row["samples_ms"]) == {"cpu_qlora_layer": 2, "cpu_qlora_step": 2, "nf4_dequant": 2}[row["bench"]]
        assert row["threads"] == 1
    assert out.count("first fused call") == 1
    assert out.count("ratio") >= 6
    from fused_lora.bench.report import render_report

    report, _ = render_report(path)  # the dequantization table tells fp32 and bf16 rows apart
    table = report.read_text().split("## NF4 dequantization alone", 1)[1]
    assert "| impl | dtype | K | N |" in table and "| fused | float32 |" in table and "| fused | bfloat16 |" in table


@pytest.mark.parametrize("argv, root", [(["--cpu"], None), (["--cpu", "--output", "out"], "out")])
def test_bench_cpu_flag_writes_a_json_only_with_output(argv, root, monkeypatch, tmp_path):
    """Even in a checkout (./bench/results exists) a plain --cpu run writes nothing; --quick takes fewer reps."""
    calls = []
    monkeypatch.setattr(command, "run_cpu_bench",
                        lambda config, results_root, threads: calls.append((config, results_root, threads))
                        or ([{"bench": "nf4_dequant"}], None))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench" / "results").mkdir(parents=True)
    assert command.main(argv) == 0
    assert calls == [(cpu_bench.ISSUE_CONFIG, None if root is None else Path(root), None)]
    assert command.main(argv + ["--quick", "--threads", "1"]) == 0
    assert calls[-1][0] == cpu_bench.QUICK_CONFIG and calls[-1][2] == 1


def test_bench_cpu_fails_when_nothing_was_measured_and_names_a_bad_backend_variable(monkeypatch, capsys):
    """--cpu returned 0 with every row skipped (no bitsandbytes, say), and a bad FUSED_LORA_BACKEND was a
    traceback from the first timed call: now exit status 1, and a one-line usage error (2) naming the variable."""
    monkeypatch.setattr(command, "run_cpu_bench", lambda config, results_root, threads: ([], None))
    assert command.main(["--cpu", "--quick"]) == 1
    assert "nothing was measured" in capsys.readouterr().err
    monkeypatch.setenv("FUSED_LORA_BACKEND", "bogus")
    assert command.main(["--cpu", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench --cpu: FUSED_LORA_BACKEND: unknown backend 'bogus'") and err.count("\n") == 1
