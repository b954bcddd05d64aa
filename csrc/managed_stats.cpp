// Allocation and prefetch counters behind fused_lora::stats(), shared by the CUDA and the host build.
#include <mutex>

#include "managed_memory.h"

namespace fused_lora {
namespace {
std::mutex stats_mutex;
ManagedStats counters;
}  // namespace

namespace detail {

void record_alloc(std::size_t bytes) {
  std::lock_guard<std::mutex> lock(stats_mutex);
  counters.live_allocations += 1;
  counters.total_allocations += 1;
  counters.live_bytes += static_cast<int64_t>(bytes);
  if (counters.live_bytes > counters.peak_bytes) counters.peak_bytes = counters.live_bytes;
}

void record_free(std::size_t bytes) {
  std::lock_guard<std::mutex> lock(stats_mutex);
  counters.live_allocations -= 1;
  counters.total_frees += 1;
  counters.live_bytes -= static_cast<int64_t>(bytes);
}

void record_prefetch(std::size_t bytes) {
  std::lock_guard<std::mutex> lock(stats_mutex);
  counters.prefetch_calls += 1;
  counters.prefetched_bytes += static_cast<int64_t>(bytes);
}

}  // namespace detail

ManagedStats stats() {
  std::lock_guard<std::mutex> lock(stats_mutex);
  return counters;
}

}  // namespace fused_lora
