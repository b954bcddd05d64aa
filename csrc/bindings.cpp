// Python bindings of fused_lora._C: torch tensors over managed memory (managed_memory.h), and the CPU backend's
// kernels (cpu_kernels.h).
//
// empty_managed returns a uint8 tensor that owns its allocation: the deleter handed to torch::from_blob frees it
// when the last tensor or view sharing the storage dies. Python views it as the state dtype and shape.
#include <torch/extension.h>

#include "cpu_kernels.h"
#include "managed_memory.h"

namespace {

void check(const std::string& error) { TORCH_CHECK(error.empty(), "fused_lora._C: ", error); }

at::Device tensor_device(int64_t device) {
  return fused_lora::is_cuda_build() ? at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device))
                                     : at::Device(at::kCPU);
}

// [data_ptr + offset, data_ptr + offset + nbytes) of a contiguous tensor; nbytes < 0 means "to the end".
std::pair<const char*, std::size_t> byte_range(const torch::Tensor& tensor, int64_t offset, int64_t nbytes) {
  TORCH_CHECK(tensor.is_contiguous(), "fused_lora._C: managed tensors must be contiguous");
  const int64_t total = tensor.numel() * static_cast<int64_t>(tensor.element_size());
  TORCH_CHECK(offset >= 0 && offset <= total, "fused_lora._C: byte offset ", offset, " is outside the tensor's ", total,
              " bytes");
  if (nbytes < 0) nbytes = total - offset;
  TORCH_CHECK(offset + nbytes <= total, "fused_lora._C: byte range [", offset, ", ", offset + nbytes,
              ") is outside the tensor's ", total, " bytes");
  return {static_cast<const char*>(tensor.data_ptr()) + offset, static_cast<std::size_t>(nbytes)};
}

torch::Tensor empty_managed(int64_t nbytes, int64_t device) {
  TORCH_CHECK(nbytes >= 0, "fused_lora._C.empty_managed: nbytes must be >= 0, got ", nbytes);
  TORCH_CHECK(device >= 0, "fused_lora._C.empty_managed: device must be a device index >= 0, got ", device);
  void* ptr = nullptr;
  check(fused_lora::managed_alloc(static_cast<std::size_t>(nbytes), static_cast<int>(device), &ptr));
  auto deleter = [nbytes, device](void* p) {
    fused_lora::managed_free(p, static_cast<std::size_t>(nbytes), static_cast<int>(device));
  };
  auto options = torch::TensorOptions().dtype(torch::kUInt8).device(tensor_device(device));
  return torch::from_blob(ptr, {nbytes}, deleter, options);
}

void prefetch(const torch::Tensor& tensor, int64_t location, uint64_t stream, int64_t offset, int64_t nbytes) {
  auto range = byte_range(tensor, offset, nbytes);
  check(fused_lora::prefetch(range.first, range.second, static_cast<int>(location),
                             static_cast<std::uintptr_t>(stream)));
}

void advise_preferred_location(const torch::Tensor& tensor, int64_t location) {
  auto range = byte_range(tensor, 0, -1);
  check(fused_lora::advise_preferred_location(range.first, range.second, static_cast<int>(location)));
}

int64_t last_prefetch_location(const torch::Tensor& tensor, int64_t offset, int64_t nbytes) {
  auto range = byte_range(tensor, offset, nbytes);
  int location = fused_lora::kUnknownLocation;
  check(fused_lora::last_prefetch_location(range.first, range.second, &location));
  return location;
}

bool concurrent_managed_access(int64_t device) {
  bool supported = false;
  check(fused_lora::concurrent_managed_access(static_cast<int>(device), &supported));
  return supported;
}

std::pair<int64_t, int64_t> memory_info(int64_t device) {
  std::size_t free_bytes = 0, total_bytes = 0;
  check(fused_lora::memory_info(static_cast<int>(device), &free_bytes, &total_bytes));
  return {static_cast<int64_t>(free_bytes), static_cast<int64_t>(total_bytes)};
}

py::dict stats() {
  fused_lora::ManagedStats s = fused_lora::stats();
  py::dict out;
  out["live_allocations"] = s.live_allocations;
  out["live_bytes"] = s.live_bytes;
  out["peak_bytes"] = s.peak_bytes;
  out["total_allocations"] = s.total_allocations;
  out["total_frees"] = s.total_frees;
  out["prefetch_calls"] = s.prefetch_calls;
  out["prefetched_bytes"] = s.prefetched_bytes;
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused-lora paged optimizer state: tensors in CUDA managed memory (host memory in a CPU build)";
  m.attr("HOST_LOCATION") = fused_lora::kHostLocation;
  m.attr("UNKNOWN_LOCATION") = fused_lora::kUnknownLocation;
  m.def("is_cuda_build", &fused_lora::is_cuda_build, "True when built against the CUDA runtime");
  m.def("empty_managed", &empty_managed, "A zeroed uint8 tensor of nbytes in managed memory usable from device",
        py::arg("nbytes"), py::arg("device"));
  m.def("prefetch", &prefetch, "Migrate a tensor (or a byte range of it) to a device index or HOST_LOCATION",
        py::arg("tensor"), py::arg("location"), py::arg("stream") = 0, py::arg("offset") = 0,
        py::arg("nbytes") = -1);
  m.def("advise_preferred_location", &advise_preferred_location, "cudaMemAdviseSetPreferredLocation on a tensor",
        py::arg("tensor"), py::arg("location"));
  m.def("last_prefetch_location", &last_prefetch_location,
        "Where a tensor (or byte range) was last prefetched: a device index, HOST_LOCATION or UNKNOWN_LOCATION",
        py::arg("tensor"), py::arg("offset") = 0, py::arg("nbytes") = -1);
  m.def("concurrent_managed_access", &concurrent_managed_access,
        "Whether the device can access managed memory concurrently with the host", py::arg("device"));
  m.def("memory_info", &memory_info, "(free, total) bytes of the device (host memory in a CPU build)",
        py::arg("device"));
  m.def("stats", &stats, "Counters of live managed allocations, bytes and prefetches");

  // the "cpu" backend (fused_lora/cpu.py)
  m.def("nf4_dequantize_into", &fused_lora::nf4_dequantize_into,
        "Dequantize NF4 bytes into a 2-D tensor (fl32(code[q] * absmax), optionally through bf16/fp16, one rounding)",
        py::arg("out"), py::arg("packed"), py::arg("absmax"), py::arg("code"), py::arg("blocksize"),
        py::arg("round_to") = "", py::arg("nested_absmax") = py::none(), py::arg("nested_code") = py::none(),
        py::arg("offset") = 0.0, py::arg("nested_blocksize") = 256, py::call_guard<py::gil_scoped_release>());
  m.def("dropout_keep", &fused_lora::dropout_keep,
        "uint8 keep mask of fused_lora.reference.dropout_mask (torch's CPU generator, same seed, same draws)",
        py::arg("rows"), py::arg("cols"), py::arg("seed"), py::arg("p"), py::call_guard<py::gil_scoped_release>());
  m.def("dropout_apply_into", &fused_lora::dropout_apply_into,
        "out = (alpha * src) * (keep ? scale : 0), out may be src; returns out", py::arg("out"), py::arg("src"),
        py::arg("keep"), py::arg("scale"), py::arg("alpha") = 1.0, py::call_guard<py::gil_scoped_release>());
  m.def("cpu_has_avx2", &fused_lora::cpu_has_avx2, "Whether this CPU has the AVX2 paths of the CPU kernels");
  m.def("cpu_use_avx2", &fused_lora::cpu_use_avx2,
        "Switch the AVX2 paths on (where the CPU has them) or off; returns the previous setting", py::arg("enable"));
}
