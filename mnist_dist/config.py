"""Typed training configuration and the named recipes (presets) that fill it.

Resolution order, lowest to highest priority:
    dataclass defaults  <  the chosen recipe  <  flags given explicitly on the command line.

``check_fields`` checks each field on its own (ranges, choices); the checks that need a feature (the
model and engine names, optional packages) or the world size are made by ``entry.validate``, so that
nothing here imports upward.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

AMP_MODES = ("auto", "bf16", "fp16", "off")
LOADERS = ("tensor", "dataloader")
SCHEDULES = ("onecycle", "constant", "cosine")
OPTIMIZERS = ("adam", "adamw", "sgd")
BACKENDS = ("auto", "nccl", "gloo")
MAX_THREADS = 1024  # --threads: far above any machine's cores (torch crashes at 100,000)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _f(default: Any, help: str) -> Any:
    """A dataclass field whose help text also becomes the command-line flag's --help."""
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # --- what to train ---
    recipe: str = _f("fast", "named preset applied before explicit flags (see RECIPES)")
    model: str = _f("fast", "architecture name from mnist_dist.models.MODELS")
    epochs: int = _f(1, "full passes over the 60,000 training images")
    batch_size: int = _f(256, "GLOBAL batch size summed over all ranks; each rank takes batch-size / world-size, "
                              "which must divide evenly")
    grad_accum: str = _f("1", "micro-batches per optimizer step (K): the global batch is per-rank micro-batch "
                              "x world size x K; 'auto': the smallest K that keeps the per-rank micro-batch "
                              "<= --max-micro-batch (a job that loses half its GPUs keeps its global batch)")
    max_micro_batch: int = _f(0, "largest per-rank micro-batch for --grad-accum auto (0: no limit)")
    lr: float = _f(0.01, "peak learning rate (OneCycle's max_lr)")
    optimizer: str = _f("adam", "adam | adamw | sgd")
    betas: tuple[float, float] = _f((0.7, 0.9), "Adam/AdamW betas (momentum for sgd is betas[0])")
    weight_decay: float = _f(0.0, "L2 (adam/sgd) or decoupled (adamw) weight decay")
    schedule: str = _f("onecycle", "onecycle | cosine | constant, stepped every optimizer step")
    label_smoothing: float = _f(0.0, "cross-entropy label smoothing")
    grad_clip: float = _f(0.0, "max global grad norm; 0 disables (applied after GradScaler.unscale_)")
    normalize: bool = _f(True, "standardise pixels with MNIST mean/std; False = scale to [0, 1] only")
    max_steps: int = _f(0, "stop after this many optimizer steps in total (0 = run all epochs); for smoke tests")
    seed: int = _f(0, "seeds the model init, the sampler order and every RNG")
    # --- data ---
    data_dir: str = _f("./data", "torchvision MNIST root (files in DIR/MNIST/raw); default: $MNIST_DATA_DIR, "
                                 "else ./data")
    download: bool = _f(True, "fetch MNIST when missing (local rank 0 per node, under a file lock)")
    loader: str = _f("tensor", "tensor: dataset held on the device | dataloader: classic DataLoader")
    num_workers: int = _f(2, "DataLoader workers (only for --loader dataloader)")
    eval_batch_size: int = _f(1000, "per-rank batch for evaluation (no gradients)")
    # --- hardware / distribution ---
    amp: str = _f("auto", "auto | bf16 | fp16 | off (auto: bf16 if supported on CUDA, else fp16; off on CPU)")
    backend: str = _f("auto", "auto (nccl on CUDA, gloo on CPU) | nccl | gloo")
    device: str = _f("auto", "auto (cuda:LOCAL_RANK if CUDA is available) | cpu | cuda")
    dist_timeout: float = _f(300.0, "seconds a collective may wait before the job fails (no hangs)")
    threads: int = _f(0, "torch CPU threads per rank; 0 = usable cores // local world size")
    # --- outputs ---
    out_dir: str = _f("", "run directory for config/metrics/summary/weights (default: runs/<timestamp>)")
    log_every: int = _f(50, "optimizer steps between progress-bar loss updates (each is one sync)")
    progress: bool = _f(True, "tqdm bar on rank 0 (also off when stderr is not a terminal)")
    # --- checkpoints and fault tolerance ---
    checkpoint_every: int = _f(0, "also checkpoint every N optimizer steps (0: only at epoch ends and on a stop signal)")
    keep: int = _f(3, "keep the newest K checkpoints in <out-dir>/checkpoints (0 keeps all)")
    checkpoint_format: str = _f("full", "full: one file, rank 0 writes the gathered state | dcp: a directory, every "
                                        "rank writes its shards (torch.distributed.checkpoint; needs storage "
                                        "every rank sees; resumes at any world size)")
    async_checkpoint: bool = _f(False, "--checkpoint-format dcp: write in the background, the next steps overlapping "
                                       "the write (one save in flight)")
    resume: str = _f("", "auto (newest complete checkpoint in --out-dir, else start fresh) or a checkpoint PATH")
    overwrite: bool = _f(False, "replace the run in a non-empty --out-dir (its files are deleted); without it, "
                                "and without --resume, a non-empty --out-dir is refused")
    stop_check_every: int = _f(10, "optimizer steps between the ranks' agreement on a stop signal (one all_reduce)")
    # --- tracking, pictures, export (mnist_dist/outputs/tracking.py, plots.py, export.py) ---
    wandb: bool = _f(False, "log to Weights & Biases from global rank 0 (needs the `track` extra)")
    wandb_mode: str = _f("", "online | offline | disabled; empty = $WANDB_MODE, else online "
                             "(online without an API key falls back to offline)")
    wandb_project: str = _f("", "wandb project; empty = $WANDB_PROJECT, else mnist-dist")
    wandb_entity: str = _f("", "wandb entity (user or team); empty = $WANDB_ENTITY / wandb's default")
    wandb_name: str = _f("", "wandb run name; empty = $WANDB_NAME, else the run directory's name")
    wandb_group: str = _f("", "wandb run group; empty = $WANDB_RUN_GROUP")
    wandb_tags: str = _f("", "comma-separated wandb tags; empty = $WANDB_TAGS")
    wandb_every: int = _f(50, "optimizer steps between logged loss/lr points (each is one host sync)")
    plots: bool = _f(True, "write curves.png, confusion_matrix.png/.json, mistakes.png (needs matplotlib)")
    export: bool = _f(True, "write model.pt2: a torch.export program with the input normalisation")
    # --- speed and the best recipe (data/augment.py, engines/_base.py, trainer.py, clock.py) ---
    augment: bool = _f(False, "random rotation/shift/zoom of each training batch on the device, "
                              "seeded from (seed, rank, epoch): resumable and reproducible")
    aug_degrees: float = _f(10.0, "--augment: max rotation in degrees")
    aug_shift: float = _f(2.0, "--augment: max shift in pixels (each axis)")
    aug_scale: float = _f(0.1, "--augment: max relative zoom (scale drawn in [1-s, 1+s])")
    sync_bn: bool = _f(False, "opt-in: BatchNorm -> SyncBatchNorm under a process group on CUDA (global-"
                              "batch statistics; NOT sync-free: host syncs and a blocking all_gather in every "
                              "BN layer). Default: per-rank BatchNorm, running stats averaged before evaluation")
    channels_last: bool = _f(False, "channels_last memory format for the model and its input batches")
    compile: bool = _f(False, "torch.compile the training model (see --compile-mode)")
    compile_mode: str = _f("default", "torch.compile mode: default | reduce-overhead (CUDA graphs) | "
                                      "max-autotune (also CUDA graphs) | max-autotune-no-cudagraphs")
    cudnn_benchmark: bool = _f(False, "torch.backends.cudnn.benchmark (CUDA only; picks the fastest kernels)")
    deterministic: bool = _f(False, "deterministic kernels: torch.use_deterministic_algorithms, cuDNN deterministic "
                                    "(no benchmark), CUBLAS_WORKSPACE_CONFIG; makes CUDA resume bit-identical "
                                    "(the CPU always is)")
    warmup_steps: int = _f(0, "untimed training steps before the run (compilation, autotuning); model, "
                              "optimizer, scheduler and scaler are then reset to their initial state")
    eval_every: int = _f(0, "also evaluate every N optimizer steps, clock paused, to time reaching "
                            "--target-accuracy (0 = only at epoch ends)")
    target_accuracy: float = _f(0.99, "test accuracy whose first reaching is timed (summary.json "
                                      "seconds_to_target, steps_to_target)")
    # --- diagnostics (mnist_dist/diagnostics/, outputs/tensorboard.py) ---
    skip_network_check: bool = _f(False, "skip the start-up network check under a launcher (a small all_reduce "
                                         "and a short bandwidth probe, recorded in config.json)")
    profile: bool = _f(False, "torch.profiler on every rank over the --profile-steps window: "
                              "<out-dir>/profile/rank-N.pt.trace.json, a top-ops table, summary.json 'profile'")
    profile_steps: str = _f("5,5,10", "--profile: WAIT,WARMUP,ACTIVE optimizer steps of the profiler schedule")
    tensorboard: bool = _f(False, "rank 0 writes <out-dir>/tensorboard/: metrics.jsonl's keys, batch_loss/lr "
                                  "every --log-every steps, the config as hparams, the pictures (needs the "
                                  "`tensorboard` extra)")
    # --- engine ---
    engine: str = _f("ddp", "ddp: our own DDP loop | accelerate: the same loop, data order, metrics and "
                            "outputs, with accelerate.Accelerator doing device placement, DDP, "
                            "mixed precision (--amp) and backward | fsdp2: the same loop with the model "
                            "sharded over the ranks (torch's fully_shard; needs torchrun)")
    reshard_after_forward: bool = _f(True, "--engine fsdp2: free each block's gathered parameters after its "
                                           "forward and gather them again for the backward (less memory); "
                                           "--no-reshard-after-forward keeps them until the backward (one "
                                           "all-gather less per block and step, more memory)")

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data


# Named presets. A recipe only sets fields; explicit command-line flags still win.
RECIPES: dict[str, dict[str, Any]] = {
    # Our default: a small two-conv net, one epoch, >= 99.0% test accuracy on the CPU in seconds.
    "fast": dict(
        model="fast", epochs=1, batch_size=256, lr=0.01, optimizer="adam", betas=(0.7, 0.9),
        schedule="onecycle", normalize=True, label_smoothing=0.1, weight_decay=0.0,
    ),
    # Best accuracy: the pool-first BatchNorm net in channels_last (per-rank BatchNorm, running
    # statistics averaged before evaluation), on-device augmentation, label smoothing, OneCycle, 15
    # epochs; >= 99.61% on each of seeds 0-4, median 99.69%, in <= 191 s of a 2-core CPU
    # (docs/performance.md).
    "best": dict(
        model="best2", epochs=15, batch_size=256, lr=0.005, optimizer="adam", betas=(0.9, 0.99),
        schedule="onecycle", normalize=True, label_smoothing=0.12, weight_decay=0.0, augment=True,
        channels_last=True,
    ),
    # The previous best recipe: model `best`, 10 epochs, NCHW (median 99.61% over seeds 0-4).
    "best-v1": dict(
        model="best", epochs=10, batch_size=256, lr=0.005, optimizer="adam", betas=(0.9, 0.99),
        schedule="onecycle", normalize=True, label_smoothing=0.1, weight_decay=0.0, augment=True,
    ),
    # The original notebook, exactly: its CNN, Adam lr 1e-4, batch 128, 7 epochs, pixels in [0, 1].
    "seed": dict(
        model="seed", epochs=7, batch_size=128, lr=1e-4, optimizer="adam", betas=(0.9, 0.999),
        schedule="constant", normalize=False, label_smoothing=0.0, weight_decay=0.0,
    ),
}


def flag_name(field: str) -> str:
    """The command-line flag of a TrainConfig field: ``batch_size`` -> ``--batch-size``."""
    return "--" + field.replace("_", "-")


def resolve_config(recipe: str, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults, then the recipe, then the explicitly given flags (``overrides``); fields checked."""
    if recipe not in RECIPES:
        raise UserError(f"unknown recipe {recipe!r}; choose one of: {', '.join(sorted(RECIPES))}")
    values: dict[str, Any] = dict(RECIPES[recipe])
    values["recipe"] = recipe
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(values) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise UserError(f"unknown config keys: {', '.join(sorted(unknown))}")
    cfg = TrainConfig(**values)
    cfg.betas = tuple(float(b) for b in cfg.betas)  # type: ignore[assignment]
    check_fields(cfg)
    return cfg


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    """K for --grad-accum (a number, or auto), checked against the batch and the world size."""
    per_rank = cfg.batch_size // world_size
    if cfg.grad_accum == "auto":
        if cfg.max_micro_batch <= 0:
            raise UserError("--grad-accum auto needs --max-micro-batch N (the largest per-rank micro-batch)")
        # the smallest K dividing the per-rank batch with a micro-batch <= the limit (K = per_rank: 1 image)
        return next(k for k in range(1, per_rank + 1) if per_rank % k == 0 and per_rank // k <= cfg.max_micro_batch)
    try:
        k = int(cfg.grad_accum)
    except ValueError:
        k = 0
    if k < 1:
        raise UserError(f"--grad-accum must be a positive integer or auto, got {cfg.grad_accum!r}")
    if cfg.batch_size % (world_size * k):
        raise UserError(
            f"--batch-size {cfg.batch_size} is the global batch (per-rank micro-batch x world size x "
            f"--grad-accum) and must be divisible by world size {world_size} x --grad-accum {k} = {world_size * k}"
        )
    return k


# Field checks, one line each: (fields, test, what the error says). NaN fails every test.
_CHECKS: tuple[tuple[tuple[str, ...], Any, str], ...] = (
    (("epochs", "batch_size", "eval_batch_size"), lambda v: v > 0, "must be a positive integer"),
    (("max_steps", "max_micro_batch", "weight_decay", "grad_clip", "num_workers", "threads", "checkpoint_every",
      "keep", "aug_degrees", "aug_shift", "warmup_steps", "eval_every"), lambda v: v >= 0, "must be >= 0"),
    (("lr", "dist_timeout", "stop_check_every", "log_every", "wandb_every"), lambda v: v > 0, "must be positive"),
    (("label_smoothing", "aug_scale"), lambda v: 0.0 <= v < 1.0, "must be in [0, 1)"),
    (("target_accuracy",), lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
    (("dist_timeout",), lambda v: not v < float("inf") or v <= 7 * 86400,  # inf, nan: the finite check's
     "must be at most 604800 s (a week: the timedelta of every wait)"),
)
_CHOICES = {"amp": AMP_MODES, "loader": LOADERS, "schedule": SCHEDULES, "optimizer": OPTIMIZERS,
            "backend": BACKENDS, "device": ("auto", "cpu", "cuda"), "compile_mode": COMPILE_MODES,
            "checkpoint_format": ("full", "dcp")}


def check_fields(cfg: TrainConfig, world_size: int = 1) -> None:
    """Checks of single fields (and the global batch against ``world_size``); one UserError line."""
    for names, ok, what in _CHECKS:
        for name in names:
            if not ok(getattr(cfg, name)):
                raise UserError(f"{flag_name(name)} {what}, got {getattr(cfg, name)}")
    # every float field must also be finite (+inf passes `> 0`); after the range checks, whose messages name NaN
    for name in (f.name for f in dataclasses.fields(cfg) if f.type in ("float", float)):
        if not abs(getattr(cfg, name)) < float("inf"):  # NaN and infinities fail
            raise UserError(f"{flag_name(name)} must be a finite number, got {getattr(cfg, name)}")
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise UserError(f"{flag_name(name)} must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}")
    if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise UserError(f"--betas must be two numbers in [0, 1), got {' '.join(map(str, cfg.betas))}")
    if cfg.threads > MAX_THREADS:  # torch.set_num_threads crashes the process far above the core count
        raise UserError(f"--threads {cfg.threads} is more than {MAX_THREADS}; this machine has "
                        f"{os.cpu_count()} CPUs (0 = usable cores // local world size)")
    if not cfg.reshard_after_forward and cfg.engine != "fsdp2":
        raise UserError(f"--no-reshard-after-forward is for --engine fsdp2 (--engine {cfg.engine} does not shard "
                        f"the parameters)")
    if cfg.deterministic and cfg.cudnn_benchmark:
        raise UserError("--deterministic and --cudnn-benchmark exclude each other (benchmark mode picks "
                        "kernels by timing, which is not deterministic)")
    if cfg.batch_size % world_size != 0:
        raise UserError(f"--batch-size {cfg.batch_size} is the global batch and must be divisible by the "
                        f"world size {world_size}")
    grad_accum_steps(cfg, world_size)


# Training flags that must not change between a checkpoint and its resume.
# --channels-last, --compile and --sync-bn change the floating-point order: a resume that changed them
# could not be bitwise the run it continues. World size, nodes, --grad-accum, --amp and --engine may
# change (elastic restarts, another GPU type).
RESUME_KEYS = ("model", "batch_size", "epochs", "max_steps", "lr", "optimizer", "betas", "schedule", "seed",
               "normalize", "label_smoothing", "weight_decay", "grad_clip", "augment", "aug_degrees",
               "aug_shift", "aug_scale", "channels_last", "compile", "sync_bn")


def check_resume_compatible(cfg: TrainConfig, state: dict[str, Any], source: str) -> None:
    """The flags that shape the math must match; world size, nodes, --grad-accum, --amp may change
    (the data position is world-size free: a mid-epoch checkpoint resumes at any world size)."""
    saved = state["config"]
    now = cfg.to_json()  # as config.json writes it (betas as a list)
    changed = [k for k in RESUME_KEYS if k in saved and saved[k] != now[k]]
    if changed:
        detail = ", ".join(f"--{k.replace('_', '-')} {saved[k]} (now {now[k]})" for k in changed)
        raise UserError(f"checkpoint {source} was written with {detail}; resume with the same training flags")
    samples = state.get("epoch_samples")
    if samples is not None and samples != int(state["step_in_epoch"]) * cfg.batch_size:
        raise UserError(f"checkpoint {source} is inconsistent: {samples} samples into the epoch is not "
                        f"{state['step_in_epoch']} global batches of {cfg.batch_size}")
