#!/usr/bin/env bash
# Launch launch/train.py (or SCRIPT) with torchrun, on one node or on several.
#
# One node (NPROC ranks; 2 by default, gloo on CPU, NCCL on GPUs):
#     bash launch/torchrun.sh --comm vsa --mode ternary --steps 300
#     NPROC=8 bash launch/torchrun.sh --comm vsa --checkpoint-dir ckpt --checkpoint-every 100
#
# Several nodes: run the same command on every node, with the same NNODES, JOB_ID and
# MASTER_ADDR (a host every node can reach: the c10d rendezvous runs there, on MASTER_PORT, and
# assigns the ranks):
#     NNODES=2 MASTER_ADDR=10.0.0.1 bash launch/torchrun.sh --comm vsa     # on each node
#
# Restarts: with MAX_RESTARTS=k torchrun restarts every rank up to k times when one fails (a
# crash, SIGKILL, a lost node); pass --checkpoint-dir and --resume auto so that each attempt goes
# on from the latest complete checkpoint:
#     MAX_RESTARTS=3 bash launch/torchrun.sh --checkpoint-dir ckpt --checkpoint-every 50 --resume auto
#
# Environment: NPROC (ranks per node, default 2), NNODES (default 1), MASTER_ADDR (default
# 127.0.0.1), MASTER_PORT (default 29400), JOB_ID (default tritter), SCRIPT (default
# launch/train.py next to this file), OMP_NUM_THREADS (default 1 per rank), PYTHON (default
# python), MAX_RESTARTS (default 0). Every argument goes to the script; TRITTER_COMM_CONFIG, if set, is read by train.py
# (as --comm-config).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
script="${SCRIPT:-$here/train.py}"
nproc="${NPROC:-2}"
nnodes="${NNODES:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
torchrun=("${PYTHON:-python}" -m torch.distributed.run --max-restarts="${MAX_RESTARTS:-0}")

if [[ "$nnodes" == 1 ]]; then
    exec "${torchrun[@]}" --standalone --nnodes=1 --nproc-per-node="$nproc" "$script" "$@"
fi

exec "${torchrun[@]}" \
    --nnodes="$nnodes" \
    --nproc-per-node="$nproc" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29400}" \
    --rdzv-id="${JOB_ID:-tritter}" \
    "$script" "$@"
