#!/usr/bin/env bash
# Convergence rows side by side on a many-core machine (used on the lent GPU host's 16 CPU
# cores; the benchmark itself runs on gloo/CPU). Usage: bash benchmarks/device_convergence.sh OUTDIR
set -euo pipefail
out=${1:-benchmarks/results}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nproc; python -c "import torch, numpy, tritter_comm; print(torch.__version__, numpy.__version__, tritter_comm.__version__)"
python benchmarks/convergence.py --workloads transformer --jobs 11 --seeds 0,1,2 \
  --modes none,fp16,powersgd1,powersgd4,vsa-ternary,vsa-sign,vsa-int2,vsa-ternary:start_iter=50,vsa-ternary:block_size=256,vsa-ternary:fixed_keys=True,vsa-int2:block_size=256 \
  --out "$out/convergence-transformer.json"
