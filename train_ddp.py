"""Train a CNN on MNIST with DistributedDataParallel (or as one plain process).

    python train_ddp.py                                         # one process, CPU or cuda:0
    torchrun --standalone --nproc_per_node=4 train_ddp.py       # 4 ranks on this machine
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=4 \\
        --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT train_ddp.py   # on each of 2 nodes
    sbatch slurm/train.sbatch                                   # SLURM, 1..N nodes
    torchrun --standalone --nproc_per_node=4 train_ddp.py --engine accelerate   # via Accelerator
    accelerate launch --multi_gpu --num_processes 4 --num_machines 1 --mixed_precision bf16 \\
        --dynamo_backend no train_ddp.py --engine accelerate  # (either engine; works on CPU too)

Flags: `python train_ddp.py --help`. Same as `mnist-dist train` / `python -m mnist_dist train`.
"""

import sys

from mnist_dist.entry import guarded, record, run_training


@record  # under torchrun, a failing rank's traceback is written for torchrun to report with its rank
def main() -> int:
    # parse -> validate -> set up (process group, device, precision) -> fit -> tear down (in finally)
    return run_training(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(guarded(main))
