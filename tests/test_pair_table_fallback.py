"""The shared-memory pair table's fallback (common.launch_lookup): a launch with LOOKUP "lds" refused for its
resources (another GPU or Triton than the launchers assumed) runs again with the byte permutes, warns once and keeps
its kernel path off the table. Run through the offline instrument's capture (an sm_90 device faked, no GPU), each in
a process of its own (the set of refused keys is the process's)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

FALLBACK = """
import json, sys, warnings
from fused_lora.bench import offline_capture
from fused_lora.bench.offline_capture import LayerSpec, capture_pass
from fused_lora.kernels import common
message, action, ms = sys.argv[1], sys.argv[2], [int(m) for m in sys.argv[3].split(",")]
kernel_arg = sys.argv[4]  # the launches watched: the decode forward's ("FRAGMENT") or the GEMMs' ("W_FIRST")
real, tried = offline_capture._launches, []
def launches(kernel, grid, args, kwargs, weight_ids):
    if "LOOKUP" in kwargs and kernel_arg in kwargs:
        tried.append(kwargs["LOOKUP"])
        if kwargs["LOOKUP"] == "lds":
            raise RuntimeError(message)
    return real(kernel, grid, args, kwargs, weight_ids)
offline_capture._launches = launches
raised = []
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter(action)
    for M in ms:
        try:
            capture_pass("fwd" if kernel_arg == "FRAGMENT" else "fwd_bwd", LayerSpec(M, 4096, 1024, 16), 90)
        except (RuntimeError, RuntimeWarning) as error:
            raised.append(type(error).__name__)
print(json.dumps({"tried": tried, "raised": raised, "warnings": [str(w.message) for w in caught],
                  "failed": sorted(" ".join(map(str, key)) for key in common.PAIR_TABLE_FAILED)}))
"""


def _fallback(message: str, action: str = "always", ms: str = "16,16", kernel_arg: str = "FRAGMENT") -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", FALLBACK, message, action, ms, kernel_arg], env=env,
                          capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_a_pair_table_that_does_not_launch_falls_back_to_the_byte_permutes():
    """Should the decode forward with the pair table be refused for its resources (a GPU or a Triton whose shared
    memory differs from what the launcher assumed), the same launch runs with the byte permutes, one warning names
    the device, and the device never tries the table again (each capture runs the pass twice: lds and prmt, then
    prmt alone, three times). Any other CUDA error is raised as it is, and nothing is switched off; with warnings as
    errors every call raises (the byte permutes ran first)."""
    got = _fallback("Triton Error [CUDA]: too many resources requested for launch")
    assert got["tried"] == ["lds", "prmt", "prmt", "prmt", "prmt"] and got["raised"] == []
    assert got["failed"] == ["decode forward 16 cuda:0"]
    table = [w for w in got["warnings"] if "shared-memory NF4 table" in w]
    assert len(table) == 1 and "cuda:0" in table[0] and "too many resources" in table[0], got["warnings"]
    # the 32-row tile (more shared memory) fails on its own: the 16-row table stays in use, and the other way round
    got = _fallback("Triton Error [CUDA]: too many resources requested for launch", ms="32,16,32,16")
    assert got["tried"] == ["lds", "prmt", "prmt", "lds", "prmt", "prmt"] + ["prmt"] * 4, got["tried"]
    assert got["failed"] == ["decode forward 16 cuda:0", "decode forward 32 cuda:0"]
    got = _fallback("Triton Error [CUDA]: an illegal memory access was encountered")
    assert got["tried"] == ["lds", "lds"] and got["raised"] == ["RuntimeError"] * 2 and got["failed"] == []
    assert not [w for w in got["warnings"] if "shared-memory NF4 table" in w]
    got = _fallback("Triton Error [CUDA]: too many resources requested for launch", "error")
    assert got["raised"] == ["RuntimeWarning"] * 2 and got["tried"] == ["lds", "prmt"] * 2 and got["failed"] == []


def test_the_middle_gemms_fall_back_from_the_pair_table_on_their_own():
    """The middle path's NF4 GEMMs take the pair table on sm_90 (launch_gemm.gemm_lookup): a refused launch of the
    forward (here split over K, N = 1024) or of dx runs again with the byte permutes, each with its own warning, and
    neither tries the table again (each keyed on its own: the decode forward's key is another)."""
    got = _fallback("Triton Error [CUDA]: too many resources requested for launch", ms="256,256", kernel_arg="W_FIRST")
    tried = got["tried"]  # the forward's, then dx's; then prmt alone (the capture's second run, the second call)
    assert tried[:4] == ["lds", "prmt", "lds", "prmt"] and len(tried) > 4 and set(tried[4:]) == {"prmt"}, tried
    failed = got["failed"]  # keyed on what sizes their shared memory: M bucket, rank, epilogue, dtypes, device
    assert [f.split(" ")[:2] for f in failed] == [["dx", "GEMM"], ["split", "forward"]] and got["raised"] == []
    assert failed[0].startswith("dx GEMM 256 16 True True") and failed[1] == "split forward torch.bfloat16 cuda:0"
    table = [w for w in got["warnings"] if "shared-memory NF4 table" in w]
    assert len(table) == 2 and all("cuda:0" in w for w in table), got["warnings"]
    got = _fallback("Triton Error [CUDA]: an illegal memory access was encountered", ms="256", kernel_arg="W_FIRST")
    assert got["tried"] == ["lds"] and got["raised"] == ["RuntimeError"] and got["failed"] == []
