#!/usr/bin/env bash
# The checks that need a GPU, in one run on the lent device machine (CI has no GPU): the CUDA
# tests (codec and its Triton kernels, exchange and DDP hook, weight sync, predictor), the codec
# kernels' GPU throughput, the codec time of one exchange and the step projection, and the Rust
# codec on that host's CPU. The native module is the one built here and carried along: take it
# from a maturin wheel (`maturin build --release`, then unzip tritter_comm/_native.abi3.so),
# since a plain `cargo build --features python` links this machine's libpython.
# Usage: bash benchmarks/device_cuda.sh OUTDIR
set -u
out=${1:-/tmp/device-out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -m tritter_comm info
python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_cuda.py tests/test_torch_codec.py \
  tests/test_triton_codec.py tests/test_sync.py tests/test_phase.py 2>&1 \
  | tee "$out/pytest-cuda.log" | tail -25
python3 -m benchmarks.codec_cuda --out "$out/codec-cuda.json" 2>&1 | tee "$out/codec-cuda.txt"
OMP_NUM_THREADS=1 python3 -m benchmarks.codec --sizes 1M,16M,64M --torch-max 1M --sweep-size 1M \
  --repeats 5 --out "$out/codec-host.json" 2>&1 | tee "$out/codec-host.txt"
