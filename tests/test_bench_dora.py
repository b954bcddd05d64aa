"""fused_lora/bench/dora.py: the offline prediction is self-consistent and the CPU timing of the reference paths runs."""

import json

import pytest

from fused_lora.bench import dora as bench_dora


def test_prediction_rows_cover_every_impl_and_rank_them_as_the_model_says():
    rows = bench_dora.prediction_rows(shapes=((4096, 4096),), m_values=(16, 8192))
    by = {(r["bench"], r["impl"], r["M"]): r for r in rows}
    assert len(rows) == 2 * (len(bench_dora.DORA_IMPLS) + len(bench_dora.MIXED_IMPLS))
    assert all(r["ms"] > 0 and r["hbm_gb"] > 0 and r["launches"] > 0 for r in rows)
    for M in (16, 8192):
        # DoRA costs more than LoRA on each side, ours less than PEFT's; at large M nothing beats the dense GEMMs
        # (at decode an NF4 layer may: it reads a quarter of the bf16 weight's bytes)
        dense = by[("dora_linear", "dense_cublas", M)]["ms"]
        assert M < 1024 or all(by[("dora_linear", impl, M)]["ms"] >= dense for impl in bench_dora.DORA_IMPLS)
        assert by[("dora_linear", "fused_dora", M)]["ms"] > by[("dora_linear", "fused_lora", M)]["ms"]
        assert by[("dora_linear", "fused_dora", M)]["ms"] < by[("dora_linear", "peft_dora", M)]["ms"]
        # PEFT materialises the N×K weight (and an identity through both adapters): more bytes than ours
        assert by[("dora_linear", "peft_dora", M)]["hbm_gb"] > 3 * by[("dora_linear", "fused_dora", M)]["hbm_gb"]
        # dropout adds a second GEMM over W each way on both sides; ours stays below PEFT's
        ms = {impl: by[("dora_linear", impl, M)]["ms"] for impl in bench_dora.DORA_IMPLS}
        assert ms["fused_dora"] < ms["fused_dora_dropout"] < ms["peft_dora_dropout"]
        assert ms["peft_dora"] < ms["peft_dora_dropout"]
    # the loop reads W once per adapter: at decode it moves several times the bytes of one shared pass
    assert by[("mixed_batch", "peft_loop", 16)]["hbm_gb"] > 3 * by[("mixed_batch", "fused_mixed", 16)]["hbm_gb"]
    assert by[("mixed_batch", "fused_mixed", 8192)]["ms"] < by[("mixed_batch", "peft_mixed", 8192)]["ms"]


def test_command_writes_the_json_only_where_asked(tmp_path, capsys, monkeypatch):
    real = bench_dora.timing
    monkeypatch.setattr(bench_dora, "timing", lambda *a, **kw: real("cpu", K=64, N=64, M=32, r=4, n_adapters=4,
                                                                     repeats=1))
    monkeypatch.chdir(tmp_path)
    assert bench_dora.main([]) == 0, "without --output"
    assert "fused_dora" in capsys.readouterr().out and not list(tmp_path.rglob("*.json")), "no file without --output"
    assert bench_dora.main(["--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fused_dora" in out and "peft_loop" in out and "cpu mixed_batch" in out
    (path,) = tmp_path.glob("dora-*.json")
    data = json.loads(path.read_text())
    assert {r["impl"] for r in data["measured"]} == {"fused_dora", "peft_dora", "fused_lora", "peft_lora",
                                                      "fused_mixed", "peft_mixed", "peft_loop"}
    assert all(r["median_ms"] > 0 for r in data["measured"])
