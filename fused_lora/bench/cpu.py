"""``python -m fused_lora bench --cpu``: the fused CPU path against PEFT + bitsandbytes on the CPU, in the same run.

Three benches (in this order), each in fp32 and bf16 compute, every pair of implementations interleaved (one call
of each in turn, after warm-up calls) and reported as a median and as the ratio peft_bnb / fused (above 1: fused is
faster):

* ``cpu_qlora_layer``: one PEFT LoRA layer over a bitsandbytes ``Linear4bit`` (K=512, N=1408, r=16, α=32, LoRA
  dropout 0.05, adapters in fp32 as PEFT keeps them), forward + backward of M=1024 rows with a fixed upstream
  gradient, against the same layer after ``fl.patch_peft_model``.
* ``cpu_qlora_step``: a Llama built from a config (hidden 512, intermediate 1408, 4 layers, 8 heads, vocabulary
  2000) with every decoder linear a ``Linear4bit`` (NF4, double quantization), PEFT LoRA r=16 on all of them with
  dropout 0.05; one forward + backward (causal-LM loss) of a batch of 4 × 256 random tokens; the patched model is
  built from the same seed.
* ``nf4_dequant``: one NF4 weight (N×K, blocksize 64, double quantization) to the compute dtype:
  ``fused_lora.dequantize_nf4`` (backend "auto": the CPU kernel) against bitsandbytes' ``dequantize_4bit``.

The machine may be shared: the load average before and after is printed and recorded, and the interleaving keeps
a load change from favouring one side. Threads: torch's current intra-op thread count (all cores by default), or
``--threads N``. On a machine shared with other jobs, 2-thread timings suffer most (an intra-op thread that
is descheduled stalls every parallel region), so the load is printed with every line.
The first fused call is timed separately and said once (the CPU path compiles nothing; it includes loading the
extension). Results are printed; a JSON is written only with ``--output DIR`` (``DIR/cpu/<YYYYmmdd-HHMM>.json``,
e.g. ``--output bench/results`` in the checkout), with the schema of ``fused_lora.bench.schema`` and the extra
fields ``ratio_vs_peft_bnb``, ``samples_ms``, ``load_avg``, ``threads``, ``first_call_ms``.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from .._common import dtype_name
from ..nf4 import NF4Weight, dequantize_nf4
from ..peft import patch_peft_model
from .environment import collect_env
from .impls import make_linear4bit
from .schema import ResultsFile, results_path

__all__ = ["CpuBenchConfig", "ISSUE_CONFIG", "QUICK_CONFIG", "TINY_CONFIG", "BENCHES", "interleaved_medians",
           "build_qlora_llama", "run_cpu_bench"]

DTYPES = (torch.float32, torch.bfloat16)
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class CpuBenchConfig:
    """The shapes and repetitions of ``run_cpu_bench``."""

    hidden: int = 512
    intermediate: int = 1408
    layers: int = 4
    heads: int = 8
    vocab: int = 2000
    batch: int = 4
    seq: int = 256
    r: int = 16
    lora_alpha: int = 32
    dropout: float = 0.05
    layer_m: int = 1024
    layer_reps: int = 7
    step_reps: int = 4
    dequant_reps: int = 20
    warmup: int = 2
    seed: int = 0


ISSUE_CONFIG = CpuBenchConfig()
QUICK_CONFIG = dataclasses.replace(ISSUE_CONFIG, layer_reps=3, step_reps=2, dequant_reps=5, warmup=1)
TINY_CONFIG = CpuBenchConfig(hidden=64, intermediate=160, layers=1, heads=4, vocab=128, batch=2, seq=16, r=4,
                             lora_alpha=8, layer_m=32, layer_reps=2, step_reps=2, dequant_reps=2, warmup=1)


def _load_avg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def interleaved_medians(fns: dict, reps: int, warmup: int) -> dict:
    """{name: (median ms, samples)} of the callables in ``fns``, run in turn ``warmup`` times untimed and then
    ``reps`` times timed, so that a change of the machine's load hits every one of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: (statistics.median(times), times) for name, times in samples.items()}


# ----------------------------------------------------------------------------------------------------------------
# What is timed


def _dequant_fns(config: CpuBenchConfig, dtype):
    """NF4 → dtype of one N×K weight: ours and bitsandbytes' over the same bytes."""
    import bitsandbytes.functional as bnbf

    torch.manual_seed(config.seed)
    weight = (torch.randn(config.intermediate, config.hidden) / config.hidden**0.5).to(dtype)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = NF4Weight.from_bnb(packed, state)
    return {"peft_bnb": lambda: bnbf.dequantize_4bit(packed, state), "fused": lambda: dequantize_nf4(ours, dtype)}


def _one_layer_peft(config: CpuBenchConfig, dtype):
    """PEFT's LoRA layer over a Linear4bit (K=hidden, N=intermediate), B random so that the low-rank path counts."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)
    weight = torch.randn(config.intermediate, config.hidden) / config.hidden**0.5

    class OneLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = make_linear4bit(weight, dtype)

        def forward(self, x):
            return self.proj(x)

    holder = OneLayer()
    holder.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets; PEFT dispatches on it
    lora = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.dropout, target_modules=["proj"])
    model = get_peft_model(holder, lora)
    with torch.no_grad():
        model.base_model.model.proj.lora_B["default"].weight.normal_(0, 0.02)
    return model.train()


def _layer_fns(config: CpuBenchConfig, dtype):
    models = {"peft_bnb": _one_layer_peft(config, dtype), "fused": _one_layer_peft(config, dtype)}
    patch_peft_model(models["fused"])
    generator = torch.Generator().manual_seed(config.seed + 1)
    x = torch.randn(config.layer_m, config.hidden, generator=generator).to(dtype).requires_grad_(True)
    g = torch.randn(config.layer_m, config.intermediate, generator=generator).to(dtype)

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            x.grad = None
            model(x).backward(g)

        return run

    return {name: step(model) for name, model in models.items()}


def build_qlora_llama(config: CpuBenchConfig, dtype):
    """The whole-model bench's PEFT QLoRA Llama: decoder linears as NF4 Linear4bit (double quantization), LoRA on all
    of them (fp32 adapters, dropout), everything else dense in ``dtype``; built from ``config.seed``."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(
        hidden_size=config.hidden, intermediate_size=config.intermediate, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, num_key_value_heads=config.heads, vocab_size=config.vocab,
        max_position_embeddings=max(config.seq, 128), tie_word_embeddings=False, use_cache=False,
    )
    llama_config._attn_implementation = "sdpa"
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(llama_config).to(dtype)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in TARGET_MODULES and isinstance(child, torch.nn.Linear):
                setattr(module, name, make_linear4bit(child.weight, dtype))
    model.is_loaded_in_4bit = True
    torch.manual_seed(config.seed + 1)
    lora = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.dropout,
                      target_modules=list(TARGET_MODULES), task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        return get_peft_model(model, lora).train()


def _step_fns(config: CpuBenchConfig, dtype):
    models = {"peft_bnb": build_qlora_llama(config, dtype), "fused": build_qlora_llama(config, dtype)}
    patched = patch_peft_model(models["fused"])
    if patched != config.layers * len(TARGET_MODULES):
        raise RuntimeError(f"patch_peft_model swapped {patched} layers, expected {config.layers * 7}")
    tokens = torch.randint(0, config.vocab, (config.batch, config.seq), generator=torch.Generator().manual_seed(7))

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(input_ids=tokens, labels=tokens).loss.backward()

        return run

    return {name: step(model) for name, model in models.items()}


# ----------------------------------------------------------------------------------------------------------------
# The run


def _first_call_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _bench_rows(bench: str, fns: dict, reps: int, warmup: int, shape: dict, dtype, extra: dict) -> list[dict]:
    """One row per implementation; ``extra`` (the fused call's first_call_ms) goes on the fused row only."""
    load_before = _load_avg()
    medians = interleaved_medians(fns, reps, warmup)
    load = {"before": load_before, "after": _load_avg()}
    ratio = medians["peft_bnb"][0] / medians["fused"][0]
    rows = []
    for impl, (median, samples) in medians.items():
        rows.append({
            "bench": bench, "impl": impl, "pass": "fwd_bwd" if bench != "nf4_dequant" else "dequant", **shape,
            "dtype": dtype_name(dtype), "median_ms": median, "tflops": None, "peak_mem_mb": None,
            "samples_ms": [round(s, 3) for s in samples], "load_avg": load, "threads": torch.get_num_threads(),
            **({"ratio_vs_peft_bnb": ratio, **extra} if impl == "fused" else {}),
        })
    return rows


BENCHES = ("cpu_qlora_layer", "cpu_qlora_step", "nf4_dequant")


def run_cpu_bench(config: CpuBenchConfig = ISSUE_CONFIG, results_root: Path | None = None, benches=BENCHES,
                  out=None, threads: int | None = None) -> tuple[list, Path | None]:
    """Run the benches of the module docstring; print one line per (bench, dtype) and return (rows, JSON path or
    None). ``results_root``: write ``results_root/cpu/<YYYYmmdd-HHMM>.json``; None writes nothing. ``out``: where
    the lines go (default sys.stdout). ``threads``: torch's intra-op thread count for the run (restored after);
    default: the current one.

    Example:
        >>> rows, path = run_cpu_bench(TINY_CONFIG)          # prints ratios, writes no file
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(config, results_root, benches, out or sys.stdout)
    finally:
        torch.set_num_threads(previous_threads)


def _run(config: CpuBenchConfig, results_root: Path | None, benches, out) -> tuple[list, Path | None]:
    env = collect_env(torch.device("cpu"))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    path = results_path(results_root, "cpu", stamp) if results_root is not None else None
    results = ResultsFile(path, env, {"cpu_bench": dataclasses.asdict(config), "benches": list(benches)})
    print(f"bench --cpu: {env['device']}, torch {env['torch']}, {torch.get_num_threads()} threads, load average "
          f"{_load_avg()}; {'writing ' + str(path) if path else 'writing no results file (--output DIR keeps one)'}",
          file=out)
    print("  ratio = PEFT+bitsandbytes median / fused median (above 1: fused is faster); medians of interleaved runs",
          file=out)
    c = config
    shapes = {
        "nf4_dequant": {"M": 0, "K": c.hidden, "N": c.intermediate, "r": 0},
        "cpu_qlora_layer": {"M": c.layer_m, "K": c.hidden, "N": c.intermediate, "r": c.r},
        "cpu_qlora_step": {"M": c.batch * c.seq, "K": c.hidden, "N": c.intermediate, "r": c.r},
    }
    makers = {"nf4_dequant": (_dequant_fns, c.dequant_reps), "cpu_qlora_layer": (_layer_fns, c.layer_reps),
              "cpu_qlora_step": (_step_fns, c.step_reps)}
    said_first_call = False
    rows = []
    for bench in benches:
        make, reps = makers[bench]
        for dtype in DTYPES:
            try:
                fns = make(c, dtype)
            except Exception as exc:  # a missing peer (bitsandbytes, PEFT, transformers) is recorded, not fatal
                results.skip({"bench": bench, "dtype": dtype_name(dtype), **shapes[bench]},
                             f"{type(exc).__name__}: {str(exc)[:300]}")
                print(f"  {bench:<16} {dtype_name(dtype):<9} skipped: {type(exc).__name__}: {exc}", file=out)
                continue
            extra = {"first_call_ms": _first_call_ms(fns["fused"])}
            if not said_first_call:
                print(f"  first fused call: {extra['first_call_ms'] / 1e3:.2f} s ({bench}, {dtype_name(dtype)}; "
                      "nothing is compiled or tuned: the CPU kernels are prebuilt in fused_lora._C, which the first "
                      "call of a process loads)", file=out)
                said_first_call = True
            bench_rows = _bench_rows(bench, fns, reps, c.warmup, shapes[bench], dtype, extra)
            for row in bench_rows:
                results.add(row)
            rows += bench_rows
            peft, fused = bench_rows
            print(f"  {bench:<16} {dtype_name(dtype):<9} peft_bnb {peft['median_ms']:9.2f} ms   fused "
                  f"{fused['median_ms']:9.2f} ms   ratio {fused['ratio_vs_peft_bnb']:5.2f}x   load "
                  f"{fused['load_avg']['after']}", file=out)
            del fns
            gc.collect()
    return rows, path
