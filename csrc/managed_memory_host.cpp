// The host-memory build of managed_memory.h, used when the extension is built without CUDA.
//
// Allocations are calloc'd host memory. A simulated page table (one location per 4 KiB page) records where each
// page was last prefetched to, so the page manager's budget, prefetch and eviction logic behaves observably the
// same as on a GPU: prefetch(ptr, n, device 0) marks those pages as "on device 0", last_prefetch_location reports
// it. memory_info reports the host's available memory, so the "never allocate more than is free" rule is the
// same check.
#ifndef FUSED_LORA_WITH_CUDA

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "managed_memory.h"

namespace fused_lora {
namespace {

constexpr std::size_t kSimulatedPageBytes = 4096;

struct Allocation {
  std::size_t bytes;
  std::vector<int> page_location;  // last prefetch location of each simulated page
};

std::mutex table_mutex;
std::map<std::uintptr_t, Allocation> table;  // keyed by start address

// The allocation that holds [ptr, ptr + bytes), or nullptr. Caller holds table_mutex.
std::pair<const std::uintptr_t, Allocation>* find_allocation(const void* ptr, std::size_t bytes) {
  auto address = reinterpret_cast<std::uintptr_t>(ptr);
  auto it = table.upper_bound(address);
  if (it == table.begin()) return nullptr;
  --it;
  if (address + bytes > it->first + it->second.bytes) return nullptr;
  return &*it;
}

// First and last simulated page of [ptr, ptr + bytes) inside `entry` (bytes > 0).
std::pair<std::size_t, std::size_t> page_span(const std::pair<const std::uintptr_t, Allocation>& entry,
                                              const void* ptr, std::size_t bytes) {
  std::size_t offset = reinterpret_cast<std::uintptr_t>(ptr) - entry.first;
  return {offset / kSimulatedPageBytes, (offset + bytes - 1) / kSimulatedPageBytes};
}

std::string out_of_range(const char* call) {
  return std::string(call) + " failed: the range is not inside a managed allocation";
}

}  // namespace

bool is_cuda_build() { return false; }

std::string managed_alloc(std::size_t bytes, int device, void** out) {
  *out = nullptr;
  std::size_t free_bytes = 0, total_bytes = 0;
  memory_info(device, &free_bytes, &total_bytes);
  if (bytes > free_bytes) {
    return "managed allocation of " + std::to_string(bytes) + " bytes refused: only " + std::to_string(free_bytes) +
           " bytes of host memory are available";
  }
  void* ptr = std::calloc(bytes == 0 ? 1 : bytes, 1);
  if (ptr == nullptr) return "calloc of " + std::to_string(bytes) + " bytes failed";
  {
    std::lock_guard<std::mutex> lock(table_mutex);
    std::size_t pages = (bytes + kSimulatedPageBytes - 1) / kSimulatedPageBytes;
    table[reinterpret_cast<std::uintptr_t>(ptr)] = Allocation{bytes, std::vector<int>(pages, kUnknownLocation)};
  }
  detail::record_alloc(bytes);
  *out = ptr;
  return "";
}

void managed_free(void* ptr, std::size_t bytes, int /*device*/) {
  if (ptr == nullptr) return;
  {
    std::lock_guard<std::mutex> lock(table_mutex);
    table.erase(reinterpret_cast<std::uintptr_t>(ptr));
  }
  std::free(ptr);
  detail::record_free(bytes);
}

std::string prefetch(const void* ptr, std::size_t bytes, int location, std::uintptr_t /*stream*/) {
  if (bytes == 0) return "";
  std::lock_guard<std::mutex> lock(table_mutex);
  auto* entry = find_allocation(ptr, bytes);
  if (entry == nullptr) return out_of_range("prefetch");
  auto [first, last] = page_span(*entry, ptr, bytes);
  for (std::size_t page = first; page <= last; ++page) entry->second.page_location[page] = location;
  detail::record_prefetch(bytes);
  return "";
}

std::string advise_preferred_location(const void* ptr, std::size_t bytes, int /*location*/) {
  std::lock_guard<std::mutex> lock(table_mutex);
  return find_allocation(ptr, bytes) == nullptr ? out_of_range("advise_preferred_location") : "";
}

std::string last_prefetch_location(const void* ptr, std::size_t bytes, int* location) {
  *location = kUnknownLocation;
  if (bytes == 0) return "";
  std::lock_guard<std::mutex> lock(table_mutex);
  auto* entry = find_allocation(ptr, bytes);
  if (entry == nullptr) return out_of_range("last_prefetch_location");
  auto [first, last] = page_span(*entry, ptr, bytes);
  int common = entry->second.page_location[first];
  for (std::size_t page = first + 1; page <= last; ++page) {
    if (entry->second.page_location[page] != common) return "";
  }
  *location = common;
  return "";
}

std::string concurrent_managed_access(int /*device*/, bool* supported) {
  *supported = true;
  return "";
}

// MemAvailable from /proc/meminfo (free memory plus the page cache the kernel can reclaim; 0 when not found).
static std::size_t meminfo_available_bytes() {
  std::FILE* file = std::fopen("/proc/meminfo", "r");
  if (file == nullptr) return 0;
  char line[256];
  unsigned long long kib = 0;
  while (std::fgets(line, sizeof line, file) != nullptr) {
    if (std::sscanf(line, "MemAvailable: %llu kB", &kib) == 1) break;
  }
  std::fclose(file);
  return static_cast<std::size_t>(kib) * 1024;
}

std::string memory_info(int /*device*/, std::size_t* free_bytes, std::size_t* total_bytes) {
  long page = sysconf(_SC_PAGESIZE);
  // MemAvailable, not sysconf(_SC_AVPHYS_PAGES) (MemFree): after reading a model's files most memory is page cache,
  // which MemFree leaves out although the kernel gives it back on demand
  std::size_t available = meminfo_available_bytes();
  *free_bytes = available != 0 ? available
                               : static_cast<std::size_t>(sysconf(_SC_AVPHYS_PAGES)) * static_cast<std::size_t>(page);
  *total_bytes = static_cast<std::size_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<std::size_t>(page);
  return "";
}

}  // namespace fused_lora

#endif  // FUSED_LORA_WITH_CUDA
