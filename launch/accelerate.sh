#!/usr/bin/env bash
# Run launch/train_accelerate.py with accelerate launch and tritter-comm switched on by
# configuration (the script itself adds one line: tritter_comm.integrations.accelerate.attach).
#
#     bash launch/accelerate.sh --steps 300 --checkpoint-dir ckpt        # 2 processes
#     NPROC=8 bash launch/accelerate.sh ...                              # 8 processes
#     TRITTER_COMM=vsa:mode=int2 bash launch/accelerate.sh ...           # override the file
#     TRITTER_COMM=none bash launch/accelerate.sh ...                    # uncompressed
#
# Environment: TRITTER_COMM_CONFIG (default launch/tritter_comm.yaml), TRITTER_COMM (a spec that
# overrides the file's items), NPROC (default: the config's num_processes, 2), ACCELERATE_CONFIG
# (default launch/accelerate_config.yaml), PYTHON (default python). Without a GPU the
# processes run on CPU (gloo).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export TRITTER_COMM_CONFIG="${TRITTER_COMM_CONFIG:-$here/tritter_comm.yaml}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python="${PYTHON:-python}"
if ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    export ACCELERATE_USE_CPU=true
fi
args=(--config_file "${ACCELERATE_CONFIG:-$here/accelerate_config.yaml}")
if [[ -n "${NPROC:-}" ]]; then
    args+=(--num_processes "$NPROC")
fi
# `python -m accelerate.commands.launch` is `accelerate launch` run by this python
exec "$python" -m accelerate.commands.launch "${args[@]}" "$here/train_accelerate.py" "$@"
