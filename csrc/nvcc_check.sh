#!/usr/bin/env bash
# Compile-only check of the CUDA sources, so a CUDA build break is caught on machines without a GPU.
#
# Every csrc/*.cu is compiled with nvcc -c for sm_80 and sm_90. The .cu files use only the CUDA runtime API and
# plain C++ (no torch headers), so no CUDA build of torch is needed.
# Optional: FUSED_LORA_CUDA12_INCLUDE=<dir with a CUDA 12 cuda_runtime.h> additionally syntax-checks them against
# CUDA 12 headers with the host compiler (the prefetch/advise APIs differ between CUDA 12 and 13).
set -euo pipefail

cd "$(dirname "$0")"
NVCC="${NVCC:-nvcc}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

"$NVCC" --version | tail -n 1
status=0
for source in *.cu; do
  for arch in sm_80 sm_90; do
    if "$NVCC" -c -std=c++17 -O2 -arch="$arch" -DFUSED_LORA_WITH_CUDA -Xcompiler -Wall \
        "$source" -o "$out/${source%.cu}.$arch.o"; then
      echo "nvcc_check: $source ($arch) ok"
    else
      echo "nvcc_check: $source ($arch) FAILED"
      status=1
    fi
  done
  if [[ -n "${FUSED_LORA_CUDA12_INCLUDE:-}" ]]; then
    # nvcc's own include directory (for crt/host_config.h), read from its dry run.
    cuda_include="$("$NVCC" --dryrun -c -x cu /dev/null -o "$out/dry.o" 2>&1 |
      sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1)"
    if "${CXX:-g++}" -std=c++17 -x c++ -fsyntax-only -DFUSED_LORA_WITH_CUDA -I"$FUSED_LORA_CUDA12_INCLUDE" \
        -I"$cuda_include" "$source"; then
      echo "nvcc_check: $source (CUDA 12 headers) ok"
    else
      echo "nvcc_check: $source (CUDA 12 headers) FAILED"
      status=1
    fi
  fi
done
exit "$status"
