"""Triton kernels and their launchers (no autograd, no nn.Module here). Triton is imported by the kernel modules
themselves, so importing this package is free; the launchers in ``lora``, ``nf4`` and ``adamw`` are what the rest of
fused_lora calls."""
