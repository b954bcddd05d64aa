"""DoRA and mixed-adapter batches on a CUDA device: bf16 / fp16 at Llama-3-8B shapes against the float64 oracles
(DESIGN's tolerance rule), and the peak memory of one DoRA layer's training step (no N×K temporary). The checks are
functions of the device so that their logic also runs on the CPU (``test_check_logic_on_the_cpu``)."""

import pytest
import torch

import fused_lora as fl
from fused_lora import dora, mixed
from fused_lora.mixed import Adapter
from fused_lora.testing import assert_close_to_reference

SCALING = 2.0


def _dora_case(device, M, K, N, r, dtype, nf4, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(M, K, device=device, generator=gen).to(dtype)
    W = (torch.randn(N, K, device=device, generator=gen) / K**0.5).to(dtype)
    weight = fl.quantize_nf4(W) if nf4 else W
    A = torch.randn(r, K, device=device, generator=gen) / K**0.5
    B = torch.randn(N, r, device=device, generator=gen) / r**0.5
    W32 = weight.dequantize(torch.float32) if nf4 else W.float()
    mag = dora.dora_row_norm_naive(W32, A, B, SCALING) * (0.5 + torch.rand(N, device=device, generator=gen))
    g = torch.randn(M, N, device=device, generator=gen).to(dtype)
    return x, weight, A, B, mag, g


def check_dora(device, M, K, N, r, dtype, nf4, backend="triton", p=0.0):
    x, weight, A, B, mag, g = _dora_case(device, M, K, N, r, dtype, nf4, seed=M + K)
    leaves = [t.clone().requires_grad_(True) for t in (x, A, B, mag)]
    torch.manual_seed(M)
    y = dora.dora_linear(leaves[0], weight, *leaves[1:3], leaves[3], SCALING, dropout_p=p, backend=backend)
    grads = torch.autograd.grad(y, leaves, g)
    W = weight.dequantize(dtype) if nf4 else weight
    m = None
    if p > 0:  # the kernels' mask for the seed dora_linear drew (its first torch.randint)
        from fused_lora.kernels import lora

        torch.manual_seed(M)
        m = lora.dropout_mask(int(torch.randint(0, 2**31 - 1, (1,)).item()), M, K, p, device)

    def oracle(cast):
        copies = [cast(t).detach().requires_grad_(True) for t in leaves]
        mask = None if m is None else m.to(torch.float64 if cast(g).dtype == torch.float64 else torch.float32)
        out = dora.dora_linear_naive(copies[0], cast(W), copies[1], copies[2], SCALING, copies[3], None, mask)
        return out, torch.autograd.grad(out, copies, cast(g))

    y64, ref = oracle(lambda t: t.double())
    y_plain, plain = oracle(lambda t: t)
    assert_close_to_reference("y", y, y_plain, y64, dtype)
    for name, ours, pl, rf in zip(("dx", "dA", "dB", "dmag"), grads, plain, ref):
        assert_close_to_reference(name, ours, pl, rf, dtype)


def check_mixed(device, M, K, N, dtype, ranks=(16, 8, 32, 4), backend="triton"):
    gen = torch.Generator(device=device).manual_seed(M)
    x = torch.randn(M, K, device=device, generator=gen).to(dtype)
    weight = fl.quantize_nf4((torch.randn(N, K, device=device, generator=gen) / K**0.5).to(dtype))
    tensors = []
    for r in ranks:
        tensors += [torch.randn(r, K, device=device, generator=gen) / K**0.5,
                    torch.randn(N, r, device=device, generator=gen) / r**0.5]
    ids = torch.randint(-1, len(ranks), (M,), device=device, generator=gen)
    g = torch.randn(M, N, device=device, generator=gen).to(dtype)
    leaves = [t.clone().requires_grad_(True) for t in [x] + tensors]
    ads = [Adapter(leaves[1 + 2 * i], leaves[2 + 2 * i], 0.5 + i) for i in range(len(ranks))]
    y = mixed.lora_linear_multi(leaves[0], weight, ads, adapter_ids=ids, backend=backend)
    grads = torch.autograd.grad(y, leaves, g)
    W = weight.dequantize(dtype)

    def oracle(cast):
        copies = [cast(t).detach().requires_grad_(True) for t in leaves]
        out = mixed.lora_linear_multi_naive(copies[0], cast(W), [(copies[1 + 2 * i], copies[2 + 2 * i], 0.5 + i)
                                                                 for i in range(len(ranks))], ids)
        return out, torch.autograd.grad(out, copies, cast(g))

    y64, ref = oracle(lambda t: t.double())
    y_plain, plain = oracle(lambda t: t)
    assert_close_to_reference("y", y, y_plain, y64, dtype)
    for index, (ours, pl, rf) in enumerate(zip(grads, plain, ref)):
        assert_close_to_reference(f"grad {index}", ours, pl, rf, dtype)


def test_check_logic_on_the_cpu(interpret_triton):
    """The GPU checks below, at a small fp32 shape on the CPU (the Triton interpreter)."""
    check_dora("cpu", 19, 128, 40, 4, torch.float32, nf4=True)
    check_dora("cpu", 80, 64, 40, 4, torch.float32, nf4=False, p=0.2)  # dropout, the fused GEMMs (M above decode)
    check_mixed("cpu", 24, 64, 40, torch.float32, ranks=(4, 2))


DORA_GPU_CASES = [(torch.bfloat16, 4096, 14336, M, nf4, 0.0) for M in (16, 2048) for nf4 in (True, False)] + [
    (torch.float16, 14336, 4096, 2048, True, 0.0), (torch.bfloat16, 4096, 14336, 2048, True, 0.1),
    (torch.bfloat16, 4096, 14336, 16, False, 0.1)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, K, N, M, nf4, p", DORA_GPU_CASES, ids=[
    f"{str(c[0])[6:]}-{c[1]}x{c[2]}-M{c[3]}-{'nf4' if c[4] else 'dense'}" + (f"-p{c[5]}" if c[5] else "")
    for c in DORA_GPU_CASES])  # fmt: skip
def test_dora_on_the_gpu_matches_float64(dtype, K, N, M, nf4, p):
    check_dora("cuda", M, K, N, 16, dtype, nf4, p=p)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, M", [(torch.bfloat16, 64), (torch.bfloat16, 2048), (torch.float16, 2048)],
                         ids=["bf16-M64", "bf16-M2048", "fp16-M2048"])  # groups below and above GROUP_ROWS
def test_mixed_batch_on_the_gpu_matches_float64(dtype, M):
    check_mixed("cuda", M, 4096, 4096, dtype)


@pytest.mark.gpu
def test_dora_step_peak_memory_has_no_weight_sized_temporary():
    """One DoRA training step over an NF4 layer allocates what a LoRA step does plus z (M×N, kept for dmag) and
    N-sized vectors; a bf16 N×K copy of W (112 MiB here) would exceed the margin many times. The ‖W_n‖² cache is
    filled by a first call, once per weight."""
    M, K, N, r = 2048, 4096, 14336, 16
    x, weight, A, B, mag, g = _dora_case("cuda", M, K, N, r, torch.bfloat16, nf4=True)
    leaves = [t.requires_grad_(True) for t in (A, B, mag)]

    def step():
        y = dora.dora_linear(x, weight, *leaves[:2], leaves[2], SCALING, backend="triton")
        return torch.autograd.grad(y, leaves, g)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    bf16, fp32 = 2, 4
    lora = M * N * bf16 + 2 * M * r * fp32 + (r * K + N * r) * fp32  # y, u, v, dA, dB (no dx: x needs none)
    dora_extra = 2 * M * N * bf16 + N * K // 64 * fp32 + 8 * N * fp32  # z and y = c⊙z, scaled block scales, vectors
    margin = 8 * 2**20
    assert extra <= lora + dora_extra + margin, (
        f"peak extra memory {extra / 2**20:.1f} MiB > {(lora + dora_extra + margin) / 2**20:.1f} MiB "
        f"(a bf16 copy of W would be {N * K * bf16 / 2**20:.0f} MiB)")
    del grads
