#!/usr/bin/env bash
# The checks that need a GPU, in one run on the lent device machine (CI has no GPU):
#   0. what the machine allows (namespaces and tc, NCCL with one rank) and where the CUDA
#      exchange synchronizes with the host (benchmarks/cuda_probe.py);
#   1. the CUDA tests (codec and its Triton kernels, exchange and DDP hook, weight sync,
#      predictor);
#   2. the codec kernels' GPU throughput, the codec time of one exchange, the step projection
#      (benchmarks/codec_cuda.py);
#   3. with NETWORK=1, the network benchmark on GPU ranks (benchmarks/network, --device cuda).
# Each part runs under its own time limit, so that one that hangs leaves the others their time.
# The native module is the one built here and carried along: take it from a maturin wheel
# (`maturin build --release`, then unzip tritter_comm/_native.abi3.so), since a plain
# `cargo build --features python` links this machine's libpython.
# Usage: bash benchmarks/device_cuda.sh OUTDIR
set -u
out=${1:-/tmp/device-out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
T_PROBE=${T_PROBE:-120} T_TESTS=${T_TESTS:-150} T_CODEC=${T_CODEC:-130} T_NET=${T_NET:-240}
nvidia-smi -L
python3 -m tritter_comm info
echo "## 0. probe"
timeout "$T_PROBE" python3 -m benchmarks.cuda_probe 2>&1 | tee "$out/probe.txt"
echo "## 1. CUDA tests"
timeout "$T_TESTS" python3 -m pytest -q -p no:cacheprovider -k "cuda or nccl or sync_debug" \
  tests/test_cuda.py tests/test_torch_codec.py tests/test_triton_codec.py tests/test_sync.py \
  tests/test_phase.py 2>&1 | tee "$out/pytest-cuda.log" | tail -30
echo "## 2. codec benchmark"
timeout "$T_CODEC" python3 -m benchmarks.codec_cuda --repeats ${REPEATS:-5} --out "$out/codec-cuda.json" 2>&1 \
  | tee "$out/codec-cuda.txt"
if [ "${NETWORK:-0}" = 1 ]; then
  echo "## 3. network benchmark, GPU ranks"
  timeout "$T_NET" python3 -m benchmarks.network --device cuda ${NETWORK_ARGS:-} \
    --out "$out/network-cuda.json" 2>&1 | tee "$out/network-cuda.txt" | tail -60
fi
