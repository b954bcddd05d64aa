"""``python -m fused_lora bench`` and the commands' --device: bad input refused with a usage error, the device given
an index, the newest results file found among other JSON, wrong results failing the run, the later stages on the
asked device, and a fallback of the end-to-end step's fused layers not reported as the fused kernels."""

import json

import pytest
import torch

from fused_lora import backend
from fused_lora.bench import command, report, schema, sweep
from test_benchmark_cli import ENV, _synthetic_gpu_results


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "4096"], "KxN"), (["--shapes", "0x5"], "KxN"), (["--shapes", "4x5x6"], "KxN"),
    (["--m", "0"], "positive integers"), (["--r", "16,-1"], "positive integers"),
    (["--max-seconds", "-1"], "seconds"), (["--max-seconds", "nan"], "seconds"),
    (["--cpu", "--threads", "0"], "positive integer"), (["--threads", "2"], "--threads applies only with --cpu"),
    (["--cpu", "--m", "16"], "--m applies only without --cpu"), (["--cpu", "--r", "8"], "--r applies only"),
    (["--cpu", "--no-e2e"], "--no-e2e applies only"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_bench_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        command.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_output_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        command.main(["--output", str(tmp_path / "file")])
    assert "is a file" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["tpu", "meta"])
def test_an_unusable_bench_device_is_one_line_and_status_2(device, capsys):
    assert command.main(["--device", device]) == 2
    assert capsys.readouterr().err.startswith("bench: --device")


def test_parse_device_gives_cuda_its_index_and_names_each_problem(monkeypatch):
    """torch.cuda.set_device refuses a CUDA device without an index: the default device of every command has one."""
    assert backend.parse_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(backend, "cuda_available", lambda: False)
    assert backend.parse_device(None) == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        backend.parse_device("cuda")
    monkeypatch.setattr(backend, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert backend.parse_device(None) == torch.device("cuda", 1)
    assert backend.parse_device("cuda") == torch.device("cuda", 1)
    assert backend.parse_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="torch sees 2 CUDA"):
        backend.parse_device("cuda:5")
    for bad, message in (("gpu0", "is not a device"), ("meta", "is not supported")):
        with pytest.raises(ValueError, match=message):
            backend.parse_device(bad)


def test_newest_results_skip_other_json_and_order_suffixes_as_numbers(tmp_path, capsys):
    """bench/results/offline/ holds the offline instrument's JSON under the same name pattern: not a results file.
    Files written in the same minute get -1, -2, ... -10: the tenth is newer than the ninth."""
    data = {"env": ENV, "results": []}
    (tmp_path / "offline").mkdir()
    (tmp_path / "offline" / "20991231-2359.json").write_text(json.dumps({"env": {"triton": "3.9"}, "rows": []}))
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "20260101-0000.json").write_text("[1, 2]")  # JSON, but not a results object
    for suffix in ("-9", "-10"):
        (tmp_path / "gpu" / f"20261130-1157{suffix}.json").write_text(json.dumps(data))
    assert schema.find_newest_results(tmp_path).name == "20261130-1157-10.json"
    only_other = tmp_path / "other"
    (only_other / "offline").mkdir(parents=True)
    (only_other / "offline" / "20261130-1157.json").write_text(json.dumps({"rows": []}))
    assert command.main(["--report", str(only_other)]) == 1
    assert "no results JSON" in capsys.readouterr().err


def test_a_wrong_forward_fails_the_run_and_is_left_out_of_the_targets(tmp_path):
    data = _synthetic_gpu_results()
    assert sweep.failures(data) == []
    fused = next(row for row in data["results"] if row["impl"] == "fused" and row["M"] == 8192)
    fused.update(rel_err=0.3, rel_err_ok=False)
    problems = sweep.failures(data)
    assert len(problems) == 1 and "relative error 3.00e-01 > 5e-02" in problems[0]
    key = (fused["K"], fused["N"], fused["M"], fused["r"], fused["pass"], fused["dtype"])
    assert "fused" not in report._layer_times(data["results"])[key]
    nothing = {"results": [], "skipped": [{"bench": "qlora_linear", "reason": "RuntimeError: CUDA out of memory"}]}
    assert "no case was measured" in sweep.failures(nothing)[0]
    budget = {"results": [], "skipped": [{"bench": "qlora_linear", "reason": "time budget (--max-seconds) spent"}]}
    assert sweep.failures(budget) == []


def test_later_stages_run_on_the_asked_device(monkeypatch):
    seen = []
    monkeypatch.setattr(sweep, "run_optimizer_bench", lambda quick, device, skip: seen.append(("optim", device)) or [])
    monkeypatch.setattr(sweep, "run_e2e_bench", lambda quick, device: seen.append(("e2e", device)) or ([], []))
    args = type("Args", (), {"quick": True})()
    results = schema.ResultsFile(None, ENV, {})
    sweep.run_optimizer_rows(args, torch.device("cpu"), results)
    sweep.run_e2e_rows(args, torch.device("cpu"), results)
    assert seen == [("optim", torch.device("cpu")), ("e2e", torch.device("cpu"))]


def test_end_to_end_verdict_is_not_given_for_a_fallback_backend(tmp_path):
    data = _synthetic_gpu_results()
    next(row for row in data["results"] if row["bench"] == "e2e_qlora_step" and row["impl"] == "fused")[
        "backend"] = "reference"
    path = tmp_path / "20260102-1200.json"
    path.write_text(json.dumps(data))
    assert command.main(["--report", str(path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "tokens/s | 2 | ≥ 1.5 | not measured (the fused layers ran the 'reference' backend)" in text
    data["results"][-1]["backend"] = "triton"
    path.write_text(json.dumps(data))
    assert command.main(["--report", str(path)]) == 0
    assert "tokens/s | 2 | ≥ 1.5 | met" in (tmp_path / "report.md").read_text()
