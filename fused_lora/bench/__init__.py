"""Benchmark tooling: ``python -m fused_lora bench`` (bench/README.md in the checkout describes what is measured).

Modules, one job each:

    command.py       ``bench``: arguments, the device, where results go, ``--report``
    sweep.py         the run: per-device defaults, the layer sweep, NF4 dequantization, the later stages
    timing.py        timers (``do_bench`` on CUDA, ``perf_counter`` on a CPU) and the roofline measurements
    environment.py   what a results file records about the machine and the code (device, versions, commit)
    impls.py         the layer under test: shapes, implementations, FLOP count, inputs, bitsandbytes layers
    e2e.py           the end-to-end QLoRA training step (PEFT + bitsandbytes vs ``patch_peft_model``)
    optimizer.py     the paged optimizers against their peers
    report.py        report.md, plots and the summary tables
    schema.py        the results JSON: schema, validation, writing

The offline performance instrument (``python -m fused_lora.bench.offline``: no GPU, predictions from compiled SASS):

    offline.py           the sweep, the rows, bench/results/offline/<stamp>.json, the join with GPU results
    offline_capture.py   what the launchers launch, found by running them on shape-only tensors as the GPU sees them
    offline_compile.py   compiling a launch for sm_90a/sm_80 and reading its ptxas log, TTGIR, PTX and SASS
    offline_kernels.py   the kernel registry: main-loop trips and strategy of each kernel (one entry per kernel)
    offline_model.py     the cost model and its H200 constants; the peer implementations
    offline_baseline.py  the plain Triton bf16 GEMM the fused main loops are compared with
    offline_report.py    report.md (targets, predictions) and compile_report.md

Import layers: this package imports the library core and ``fused_lora.cli.quiet``; the core never imports it.
bitsandbytes, PEFT, transformers, Triton, tqdm and matplotlib are imported inside the functions that need them:
``--report`` needs only matplotlib of them, and a case whose peer package is missing is recorded as skipped.
"""
