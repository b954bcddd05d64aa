// CPU kernels of the "cpu" backend (fused_lora/cpu.py): NF4 dequantization and the LoRA dropout mask.
//
// Host C++ only (no CUDA), built into fused_lora._C in every build. Vectorised with AVX2 where the CPU has it
// (chosen at run time), threaded with at::parallel_for (torch's intra-op threads, torch.set_num_threads).
#pragma once

#include <torch/extension.h>

namespace fused_lora {

// W' = fl32(code[q] · absmax[b]) for the rows × cols elements of a row-major NF4 weight, written into `out`
// (2-D, rows × cols, unit column stride, any row stride ≥ cols; float32, float64, bfloat16 or float16). Element e
// (row e / cols, column e % cols) takes its 4-bit index q from byte e / 2 of `packed` (high nibble when e is
// even) and its scale from block b = e / blocksize. `round_to` ("", "bfloat16" or "float16"): round the fp32
// value to that dtype first (so a float32 `out` holds exactly the bf16/fp16 weight a half-precision dequantize
// gives). Every value is rounded once to out's dtype, round to nearest even, as torch's .to(dtype).
// absmax: float32 [n_blocks]; with double quantization (nested_absmax and nested_code given) uint8 codes, decoded
// per block as fl(fl(nested_code[absmax[b]] · nested_absmax[b / nested_blocksize]) + offset).
void nf4_dequantize_into(torch::Tensor out, const torch::Tensor& packed, const torch::Tensor& absmax,
                         const torch::Tensor& code, int64_t blocksize, const std::string& round_to,
                         const c10::optional<torch::Tensor>& nested_absmax,
                         const c10::optional<torch::Tensor>& nested_code, double offset, int64_t nested_blocksize);

// keep[i, j] (uint8, rows × cols) of fused_lora.reference.dropout_mask(shape, p, seed): torch's CPU generator
// (mt19937 seeded with `seed`) draws rand = (r & 0xFFFFFF) · 2^-24 in row-major order, keep = rand ≥ fl32(p).
torch::Tensor dropout_keep(int64_t rows, int64_t cols, int64_t seed, double p);

// out = (alpha · src) · m with m = keep ? scale : 0, computed in fp32 (fp64 when src or out is fp64) and rounded once
// to out's dtype; src and out are 2-D with unit column strides (any row strides) and may be the same tensor (in
// place). Returns out. As the reference applies its fp32 mask: a dropped inf or NaN gives NaN.
torch::Tensor dropout_apply_into(torch::Tensor out, const torch::Tensor& src, const torch::Tensor& keep, double scale,
                                 double alpha);

// Whether this CPU has the vectorised (AVX2) paths of the NF4 decode and the dropout mask.
bool cpu_has_avx2();

// Use the AVX2 paths (where the CPU has them) or the portable ones; returns the previous setting (for tests).
bool cpu_use_avx2(bool enable);

}  // namespace fused_lora
