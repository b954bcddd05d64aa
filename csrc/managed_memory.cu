// Managed (unified) memory through the CUDA runtime API: see managed_memory.h.
//
// Only the runtime API and plain C++ are used here (no torch headers), so this file compiles with nvcc alone
// (csrc/nvcc_check.sh) and the same source serves CUDA 12 and CUDA 13:
//   CUDA 12: cudaMemPrefetchAsync(ptr, bytes, int device, stream),  cudaMemAdvise(ptr, bytes, advice, int device)
//   CUDA 13: cudaMemPrefetchAsync(ptr, bytes, cudaMemLocation, flags, stream),
//            cudaMemAdvise(ptr, bytes, advice, cudaMemLocation)
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>
#include <string>

#include "managed_memory.h"

namespace fused_lora {
namespace {

std::string describe(const char* call, cudaError_t status) {
  // Consume the runtime's last error as well: the extension shares libcudart with torch, whose next launch check
  // (cudaGetLastError) would otherwise report this failure against an unrelated kernel.
  cudaGetLastError();
  return std::string(call) + " failed: " + cudaGetErrorString(status);
}

// Makes `device` current for the lifetime of the guard and restores the previous device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    status_ = cudaGetDevice(&previous_);
    if (status_ == cudaSuccess && device != previous_) {
      status_ = cudaSetDevice(device);
      switched_ = status_ == cudaSuccess;
    }
  }
  // A destructor cannot report; restoring a device that was current a moment ago fails only if the context is gone.
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);
  }
  cudaError_t status() const { return status_; }

 private:
  int previous_ = 0;
  bool switched_ = false;
  cudaError_t status_ = cudaSuccess;
};

// managed_free runs inside a tensor deleter, which cannot throw: failures are printed. At process exit the runtime
// may already be unloaded; there is nothing left to free then, so that case stays silent.
void report_free_failure(const char* call, cudaError_t status) {
  if (status == cudaErrorCudartUnloading) return;
  std::fprintf(stderr, "fused_lora._C: %s\n", describe(call, status).c_str());
}

#if CUDART_VERSION >= 13000
cudaMemLocation to_mem_location(int location) {
  cudaMemLocation loc{};
  if (location == kHostLocation) {
    loc.type = cudaMemLocationTypeHost;
    loc.id = 0;
  } else {
    loc.type = cudaMemLocationTypeDevice;
    loc.id = location;
  }
  return loc;
}
#else
int to_device_id(int location) { return location == kHostLocation ? cudaCpuDeviceId : location; }
#endif

}  // namespace

bool is_cuda_build() { return true; }

std::string managed_alloc(std::size_t bytes, int device, void** out) {
  *out = nullptr;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return describe("cudaSetDevice", guard.status());
  std::size_t free_bytes = 0, total_bytes = 0;
  cudaError_t status = cudaMemGetInfo(&free_bytes, &total_bytes);
  if (status != cudaSuccess) return describe("cudaMemGetInfo", status);
  if (bytes > free_bytes) {
    return "managed allocation of " + std::to_string(bytes) + " bytes refused: device " + std::to_string(device) +
           " has only " + std::to_string(free_bytes) +
           " bytes free, and oversubscribing managed memory can hang the GPU; free memory or lower the state size";
  }
  void* ptr = nullptr;
  status = cudaMallocManaged(&ptr, bytes == 0 ? 1 : bytes, cudaMemAttachGlobal);
  if (status != cudaSuccess) return describe("cudaMallocManaged", status);
  // Zero from the host: the pages start resident in host memory and move only when prefetched.
  std::memset(ptr, 0, bytes);
  detail::record_alloc(bytes);
  *out = ptr;
  return "";
}

void managed_free(void* ptr, std::size_t bytes, int device) {
  if (ptr == nullptr) return;
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) report_free_failure("cudaSetDevice", guard.status());
  // Kernels of any stream (updates on the compute stream, prefetches on the side stream) may still use the range.
  // cudaFree of a cudaMallocManaged pointer is only documented to *possibly* synchronize, so wait explicitly.
  cudaError_t status = cudaDeviceSynchronize();
  if (status != cudaSuccess) report_free_failure("cudaDeviceSynchronize", status);
  status = cudaFree(ptr);
  if (status != cudaSuccess) report_free_failure("cudaFree", status);
  detail::record_free(bytes);
}

std::string prefetch(const void* ptr, std::size_t bytes, int location, std::uintptr_t stream) {
  if (bytes == 0) return "";
  auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
#if CUDART_VERSION >= 13000
  cudaError_t status = cudaMemPrefetchAsync(ptr, bytes, to_mem_location(location), 0, cuda_stream);
#else
  cudaError_t status = cudaMemPrefetchAsync(ptr, bytes, to_device_id(location), cuda_stream);
#endif
  if (status != cudaSuccess) return describe("cudaMemPrefetchAsync", status);
  detail::record_prefetch(bytes);
  return "";
}

std::string advise_preferred_location(const void* ptr, std::size_t bytes, int location) {
  if (bytes == 0) return "";
#if CUDART_VERSION >= 13000
  cudaError_t status = cudaMemAdvise(ptr, bytes, cudaMemAdviseSetPreferredLocation, to_mem_location(location));
#else
  cudaError_t status = cudaMemAdvise(ptr, bytes, cudaMemAdviseSetPreferredLocation, to_device_id(location));
#endif
  if (status != cudaSuccess) return describe("cudaMemAdvise", status);
  return "";
}

std::string last_prefetch_location(const void* ptr, std::size_t bytes, int* location) {
  *location = kUnknownLocation;
  if (bytes == 0) return "";
  int raw = cudaInvalidDeviceId;
  cudaError_t status =
      cudaMemRangeGetAttribute(&raw, sizeof(raw), cudaMemRangeAttributeLastPrefetchLocation, ptr, bytes);
  if (status != cudaSuccess) return describe("cudaMemRangeGetAttribute", status);
  if (raw == cudaCpuDeviceId) {
    *location = kHostLocation;
  } else if (raw >= 0) {
    *location = raw;
  }
  return "";
}

std::string concurrent_managed_access(int device, bool* supported) {
  int value = 0;
  cudaError_t status = cudaDeviceGetAttribute(&value, cudaDevAttrConcurrentManagedAccess, device);
  if (status != cudaSuccess) return describe("cudaDeviceGetAttribute", status);
  *supported = value != 0;
  return "";
}

std::string memory_info(int device, std::size_t* free_bytes, std::size_t* total_bytes) {
  DeviceGuard guard(device);
  if (guard.status() != cudaSuccess) return describe("cudaSetDevice", guard.status());
  cudaError_t status = cudaMemGetInfo(free_bytes, total_bytes);
  if (status != cudaSuccess) return describe("cudaMemGetInfo", status);
  return "";
}

}  // namespace fused_lora
