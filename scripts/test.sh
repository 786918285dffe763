#!/usr/bin/env bash
# Install into .venv with the test extras, then run the whole test suite; with no arguments,
# the kernel and fusion tests run a second time on oneDNN's AVX2 code paths (the int16-pair
# kernels of CPUs without VNNI), whatever this CPU has.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-venv.sh test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
# (skipped where the CPU itself has no VNNI / AMX: the whole suite just ran on those paths)
if [ "$#" -eq 0 ] && grep -qwE 'avx512_vnni|avx_vnni|amx_int8' /proc/cpuinfo 2>/dev/null; then
    ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python -m pytest -q -p no:cacheprovider \
        tests/test_kernels.py tests/test_conv_geometry.py tests/test_kernel_layout.py \
        tests/test_int8graph.py tests/test_encoder.py tests/test_workflow.py tests/test_export.py
fi
