"""The command line of fused-lora: ``python -m fused_lora {demo,check,info}`` (``bench`` lives in
``fused_lora.bench``). ``fused_lora/__main__.py`` dispatches to the ``main(argv)`` of each command module.

Modules, one job each:

    demo.py          ``demo``: arguments, input checks, the run and its summary
    demo_data.py     the demo's tokenizers and instruction data (the shipped set is ``fused_lora/data/``)
    demo_model.py    the demo's base model, its NF4 loading and the PEFT LoRA wrapping
    demo_train.py    the demo's training loop, held-out loss, peak memory and the parity check against PEFT
    check.py         ``check``: the active backend against the float64 reference
    info.py          ``info``: which backends and optional packages this machine has
    quiet.py         the one filter for third-party notices every command would otherwise print

Import layers: this package and ``fused_lora.bench`` (the tooling) import the library core (every other module
of ``fused_lora``); the core imports neither. Heavy optional packages (transformers, peft, bitsandbytes, tqdm) are
imported inside the functions that need them, so a command pays only for the packages it uses (``info`` imports
them only to report their versions).
"""
