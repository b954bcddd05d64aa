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

Import layers: this package imports the library core and ``fused_lora.cli.quiet``; the core never imports it.
bitsandbytes, PEFT, transformers, Triton, tqdm and matplotlib are imported inside the functions that need them:
``--report`` needs only matplotlib of them, and a case whose peer package is missing is recorded as skipped.
"""
