#!/usr/bin/env bash
# A plain sbatch script, for those who prefer sbatch to `--launcher slurm` (which submits through submitit):
# one array element per run of the grid. Element I runs the I-th run only:
#     python -m bench.run GRID --array-index I
# Runs are numbered methods first, then seeds within each method. With the GRID below (2 methods x 2 seeds):
#     0 ste seed 0, 1 ste seed 1, 2 ema seed 0, 3 ema seed 1
#
#   1. Edit GRID below. Flags after the script name are passed on to every run, for example --steps 2000.
#   2. Make --array match the grid: `python -m bench.run GRID --count` prints N; use --array=0-(N-1).
#      Change the line below, or override it when you submit:
#          n=$(python -m bench.run --methods ste,ema --seeds 0,1 --count)
#          sbatch --array=0-$((n - 1)) slurm/sbatch-example.sh
#   3. Activate the environment that has vq-bench installed, then submit from the directory that should hold
#      results/ and runs/:
#          sbatch slurm/sbatch-example.sh
#      sbatch passes your environment on to the job (python, PYTHONPATH, VQBENCH_DATA, SLURM_CONF).
#
# Rerun failed elements only: sbatch --array=2,3 slurm/sbatch-example.sh. A run whose record exists is skipped,
# and a run that has a checkpoint resumes from it. When the time limit is near, SLURM sends SIGUSR1 (the
# --signal line below). The job then requeues itself and resumes from its last checkpoint
# (--ckpt-every steps); it repeats this until the run is finished.
# Options on the sbatch command line override the #SBATCH lines. For example, on slurm/local-cluster.sh:
#     sbatch --partition=debug --gpus-per-node=0 --cpus-per-task=1 --mem=2G --time=10 slurm/sbatch-example.sh
#
# Several GPUs per run (data parallel): give each element one task per GPU. srun below starts the tasks, and each
# becomes one rank of the run (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT from SLURM's variables;
# nccl; rank r on cuda:LOCAL_RANK, so the tasks must see all the node's GPUs: no --gpus-per-task, no --gpu-bind).
# --mem is per node, --cpus-per-task per rank. For example, each run over 2 nodes of 8 GPUs (16 ranks):
#     sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=8 --mem=256G slurm/sbatch-example.sh --preset mq-celeba-vqvae
# The global batch (--batch-size) must split into equal rank slices. Two CPU ranks (gloo) on slurm/local-cluster.sh:
#     sbatch --partition=debug --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 --mem=4G --time=10 \
#         slurm/sbatch-example.sh --device cpu
# (torchrun under srun does the same with one task per node: srun torchrun --nnodes "$SLURM_NNODES"
# --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" -m bench.run ...)
#
#SBATCH --job-name=vq-bench
#SBATCH --array=0-3
#SBATCH --partition=gpu
#SBATCH --nodes=1
#SBATCH --gpus-per-node=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=24:00:00
#SBATCH --output=slurm-vq-bench-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
set -euo pipefail

GRID=(--methods "ste,ema" --seeds "0,1" --out results --scratch runs)
PYTHON=${PYTHON:-python}

if [[ -z ${SLURM_ARRAY_TASK_ID:-} ]]; then
    echo "submit this script with sbatch (it is an array job; see the top of $0)" >&2
    exit 2
fi

# The first element checks that the array covers the grid (each element checks its own index anyway).
if [[ $SLURM_ARRAY_TASK_ID == "${SLURM_ARRAY_TASK_MIN:-0}" ]]; then
    n=$("$PYTHON" -m bench.run "${GRID[@]}" "$@" --count)
    if (( ${SLURM_ARRAY_TASK_MAX:-0} < n - 1 )); then
        echo "warning: the grid has $n runs, but this array ends at ${SLURM_ARRAY_TASK_MAX:-?}:" \
             "runs $(( ${SLURM_ARRAY_TASK_MAX:-0} + 1 ))..$((n - 1)) are not submitted (sbatch --array=0-$((n - 1)))" >&2
    fi
fi

# Near the time limit: requeue this element. SLURM then stops the run (SIGTERM), and the element starts again
# later. The new start resumes from the run's last checkpoint.
requeue() {
    echo "time limit near: requeueing ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" >&2
    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
}
trap requeue USR1

# The ranks of the run (one per task; one task: one process, no process group) meet at the first node, on a port
# derived from the element's own job id (the same after a requeue).
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))
export MASTER_ADDR MASTER_PORT
echo "array element $SLURM_ARRAY_TASK_ID on $(hostname), restart ${SLURM_RESTART_COUNT:-0}," \
     "${SLURM_NTASKS:-1} rank(s) (master $MASTER_ADDR:$MASTER_PORT)" >&2
# --threads: SLURM grants --cpus-per-task cores, but torch counts every core of the node.
# The run goes in the background: bash runs a trap only between commands, and `wait` is one it interrupts.
# Each task sets its rank from SLURM's per-task variables, then becomes the run's process.
srun --kill-on-bad-exit=1 bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
    exec "$@"' rank "$PYTHON" -m bench.run "${GRID[@]}" "$@" --array-index "$SLURM_ARRAY_TASK_ID" \
    --threads "${SLURM_CPUS_PER_TASK:-0}" --quiet &
run=$!
while :; do
    status=0
    wait "$run" || status=$?
    kill -0 "$run" 2>/dev/null || exit "$status"   # the run ended (else a signal woke `wait`: wait again)
done
