// Unified (managed) memory for paged optimizer state: the backend-neutral interface.
//
// Two implementations share this header:
//   managed_memory.cu        CUDA runtime API (cudaMallocManaged, cudaMemPrefetchAsync, cudaMemAdvise, ...)
//   managed_memory_host.cpp  a host-memory build for machines without CUDA: the same calls over calloc'd memory,
//                            with a simulated page table so residency and prefetch logic can be tested on a CPU.
// Neither includes torch headers; the torch bindings live in bindings.cpp.
//
// Locations: a device index >= 0, kHostLocation for host memory, kUnknownLocation when a range has never been
// prefetched or its pages are in different places.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace fused_lora {

constexpr int kHostLocation = -1;
constexpr int kUnknownLocation = -2;

struct ManagedStats {
  int64_t live_allocations = 0;   // allocations not yet freed
  int64_t live_bytes = 0;         // bytes held by those allocations
  int64_t peak_bytes = 0;         // maximum of live_bytes since the process started
  int64_t total_allocations = 0;  // allocations made since the process started
  int64_t total_frees = 0;        // allocations freed since the process started
  int64_t prefetch_calls = 0;     // prefetch requests issued
  int64_t prefetched_bytes = 0;   // bytes covered by those requests
};

// Every function that can fail returns an empty string on success and a message naming the failing call otherwise.

// True when this build talks to the CUDA runtime, false for the host-memory build.
bool is_cuda_build();

// Allocates `bytes` of zeroed managed memory usable from `device` and the host. Refuses (message, *out = nullptr)
// when `bytes` exceeds the free memory of the device, so that managed memory is never oversubscribed.
std::string managed_alloc(std::size_t bytes, int device, void** out);

// Frees an allocation made by managed_alloc; `bytes` and `device` are the values it was made with. Waits for all
// work on `device` first (any stream may still use the range). Called from tensor deleters, so it cannot throw:
// a failing CUDA call is printed to stderr.
void managed_free(void* ptr, std::size_t bytes, int device);

// Asynchronously migrates [ptr, ptr + bytes) to `location` (a device index or kHostLocation) on `stream`
// (a cudaStream_t passed as an integer; 0 is the legacy default stream).
std::string prefetch(const void* ptr, std::size_t bytes, int location, std::uintptr_t stream);

// Sets the preferred location of [ptr, ptr + bytes) (cudaMemAdviseSetPreferredLocation).
std::string advise_preferred_location(const void* ptr, std::size_t bytes, int location);

// The location [ptr, ptr + bytes) was last prefetched to, or kUnknownLocation.
std::string last_prefetch_location(const void* ptr, std::size_t bytes, int* location);

// Whether `device` can access managed memory concurrently with the host (cudaDevAttrConcurrentManagedAccess).
std::string concurrent_managed_access(int device, bool* supported);

// Free and total memory of `device` in bytes (cudaMemGetInfo; host memory in the host build).
std::string memory_info(int device, std::size_t* free_bytes, std::size_t* total_bytes);

ManagedStats stats();

namespace detail {
// Bookkeeping shared by both implementations (managed_stats.cpp).
void record_alloc(std::size_t bytes);
void record_free(std::size_t bytes);
void record_prefetch(std::size_t bytes);
}  // namespace detail

}  // namespace fused_lora
