#!/usr/bin/env bash
# The checks that need a GPU, in one run on the lent device machine (CI has no GPU):
#   0. what the machine allows (namespaces and tc, NCCL with one rank) and where the CUDA
#      exchange synchronizes with the host (benchmarks/cuda_probe.py);
#   1. the CUDA tests (codec and its Triton kernels, exchange and DDP hook, weight sync,
#      predictor);
#   2. the codec kernels' variants timed side by side (benchmarks/codec_cuda_sweep.py), then,
#      with the fastest, their GPU throughput, the codec time of one exchange, the step
#      projection (benchmarks/codec_cuda.py);
#   3. with NETWORK=1, the network benchmark on GPU ranks (benchmarks/network, --device cuda;
#      NETWORK_ARGS replaces its default flags, T_NET its time limit).
# Each part runs under its own time limit, so that one that hangs leaves the others their time.
# PARTS (default "probe tests sweep codec") picks the parts; NETWORK=1 adds "network".
# The native module is the one built here and carried along: take it from a maturin wheel
# (`maturin build --release`, then unzip tritter_comm/_native.abi3.so), since a plain
# `cargo build --features python` links this machine's libpython.
# Usage: bash benchmarks/device_cuda.sh OUTDIR
set -u
out=${1:-/tmp/device-out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
T_PROBE=${T_PROBE:-120} T_TESTS=${T_TESTS:-150} T_CODEC=${T_CODEC:-130} T_NET=${T_NET:-240}
T_SWEEP=${T_SWEEP:-200}
PARTS=" ${PARTS:-probe tests sweep codec} "
[ "${NETWORK:-0}" = 1 ] && PARTS="$PARTS network "
nvidia-smi -L
python3 -m tritter_comm info
if [[ $PARTS == *" probe "* ]]; then
  echo "## 0. probe"
  timeout "$T_PROBE" python3 -m benchmarks.cuda_probe 2>&1 | tee "$out/probe.txt"
fi
if [[ $PARTS == *" tests "* ]]; then
  echo "## 1. CUDA tests"
  timeout "$T_TESTS" python3 -m pytest -q -p no:cacheprovider -k "cuda or nccl or sync_debug" \
    tests/test_triton_codec.py tests/test_cuda.py tests/test_torch_codec.py tests/test_sync.py \
    tests/test_phase.py -rfE 2>&1 | tee "$out/pytest-cuda.log" | tail -30
fi
tuning=()
if [[ $PARTS == *" sweep "* ]]; then
  echo "## 2a. codec kernel variants"
  timeout "$T_SWEEP" python3 -m benchmarks.codec_cuda_sweep --repeats ${REPEATS:-5} ${SWEEP_ARGS:-} \
    --out "$out/codec-sweep.json" 2>&1 | tee "$out/codec-sweep.txt"
  [ -s "$out/codec-sweep.json" ] && tuning=(--tuning "$out/codec-sweep.json")
fi
if [[ $PARTS == *" codec "* ]]; then
  echo "## 2. codec benchmark"
  timeout "$T_CODEC" python3 -m benchmarks.codec_cuda --repeats ${REPEATS:-5} "${tuning[@]}" \
    --out "$out/codec-cuda.json" 2>&1 | tee "$out/codec-cuda.txt"
fi
# Part 3 (issue 16, item 6): 2 ranks on the one GPU, gloo over a veth pair between two network
# namespaces, tc rate 1 and 10 Gbit/s; the 43M transformer at both, the 303M one at 10 Gbit/s
# only (its no-hook step takes ~10 s at 1 Gbit/s: add `--links-for xl=1gbit,10gbit` and about
# 2 minutes to T_NET for it). Each mode timed alone (--no-pair: the machine is not shared).
# Without iproute2 the namespaces and tc go through pyroute2 (netlink from Python): installed
# from a carried wheel (.whl/pyroute2-*.whl) when it does not import. Where namespaces or tc
# are refused, the benchmark says so and measures the host's loopback only.
NETWORK_DEFAULT="--worlds 2 --links 1gbit,10gbit --workloads large,xl --links-for xl=10gbit \
--modes none,bf16,powersgd4,vsa,vsa+auto --no-ttt --no-pair --timed-budget 3"
if [[ $PARTS == *" network "* ]]; then
  echo "## 3. network benchmark, GPU ranks"
  if ! command -v ip >/dev/null && ! python3 -c "import pyroute2" 2>/dev/null; then
    ls .whl/pyroute2-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps \
      --target /tmp/site .whl/pyroute2-*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
  fi
  timeout "$T_NET" python3 -m benchmarks.network --device cuda ${NETWORK_ARGS:-$NETWORK_DEFAULT} \
    --out "$out/network-cuda.json" 2>&1 | tee "$out/network-cuda.txt" | tail -60
  python3 -m benchmarks.network --cleanup  # namespaces of a run that timeout had to kill
  tar czf "$out/network-logs.tgz" /tmp/tritter-network-* 2>/dev/null  # the ranks' logs
fi
