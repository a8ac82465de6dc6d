"""Train BS-ESNet (or an ablation) with the paper's asynchronous schedule; resumable; CPU, CUDA or torchrun DDP.

``python -m training.train --config training/configs/bsesnet.json --data ../shared/data/sy_lumbar_muscle
../shared/data/myosegmentum_lpm --out runs/x [--folds 5 --fold K | --all] [--resume] [--epochs N]``

Data are prepared once on the model grid and kept as tensors on the training device; batches are drawn
by index and augmented there (no DataLoader, no worker processes). Writes into ``--out``:
``checkpoint.pt`` (resume only; ``torch.load(weights_only=True)``, never shipped), ``history.json``,
``final.json``/``final.safetensors`` (library weights format) and, with a validation fold,
``best.json``/``best.safetensors`` (highest validation Dice on the model grid).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from ParaspinalSegLib import weights
from ParaspinalSegLib.network import build_network
from ParaspinalSegLib.preprocessing import ModelInput, NormalisationConfig
from ParaspinalSegLib.serialisation import json_ready

from .augment import augment_batch
from .config import load_config, network_config
from .data import SliceRecord, load_sources, prepare_records, structures_learned, subject_folds
from .evaluate import canonical_dice
from .losses import training_loss
from .provenance import check_cv_reports
from .splits import fold_indices, read_splits
from .schedule import apply_phase, build_optimizer, esnet_training_epochs, phase_for_epoch

CHECKPOINT = "checkpoint.pt"


@dataclass
class RunResult:
    """What :func:`train` produced."""

    out_dir: Path
    epochs_done: int
    history: list[dict[str, Any]] = field(default_factory=list)
    best_val_dice: float = math.nan
    final_weights: Optional[Path] = None
    best_weights: Optional[Path] = None
    #: Wall seconds of each optimisation step of this call (the first includes warm-up).
    step_seconds: list[float] = field(default_factory=list)


def _dist() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (1 process otherwise)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def resolve_device(device: str = "auto") -> torch.device:
    """The library's :func:`~ParaspinalSegLib.weights.resolve_device` on this process's GPU (torchrun's local rank)."""
    return weights.resolve_device(device, cuda_index=_dist()[2])


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX); emulated bf16 would be slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def mixed_precision(dev: torch.device, enabled: bool) -> Optional[torch.dtype]:
    """The autocast dtype for ``config["amp"]`` on ``dev``, or None for plain fp32.

    CUDA: bf16 where supported, else fp16 (with a gradient scaler). CPU: bf16 only where the hardware
    has it (about 1.6× faster steps on an AVX512-BF16 laptop/server core); the loss is always float32.
    """
    if not enabled:
        return None
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def set_determinism(seed: int, deterministic: bool) -> None:
    """Seed torch and ask for deterministic kernels (CPU runs are bitwise repeatable)."""
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def export_weights(model: torch.nn.Module, path: Path, config: Mapping[str, Any], records: Sequence[SliceRecord], training: Mapping[str, Any], metrics: Mapping[str, Any]) -> Path:
    """Write the model in the library's weights format (tensors + JSON config + SHA-256)."""
    from ParaspinalSegLib.weights import save_weights

    return save_weights(
        model,
        path,
        structures_learned=structures_learned(records),
        model_input=ModelInput.from_dict(config["model_input"]),
        normalisation=NormalisationConfig.from_dict(config["normalisation"]),
        training=json_ready(dict(training)),
        metrics=json_ready(dict(metrics)),
        name=str(training.get("name", path.stem)),
    )


@dataclass(eq=False)
class _Run:
    """Everything one :func:`train` call works with; what a checkpoint holds is :meth:`checkpoint`."""

    config: Mapping[str, Any]
    out: Path
    dev: torch.device
    rank: int
    world: int
    train_data: Any
    val_data: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    amp_dtype: Optional[torch.dtype]
    order_gen: torch.Generator
    aug_gen: torch.Generator
    info: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float = -math.inf
    start: int = 0

    @property
    def ddp(self) -> bool:
        return self.world > 1

    def checkpoint(self, epoch: int, aug_states: list[torch.Tensor]) -> dict[str, Any]:
        """The resumable state after ``epoch``: parameters, optimizer, mixed-precision scaler, RNGs, history."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            # fp16's loss scale and its growth counter: without them a resumed fp16 run is not the same run.
            "scaler": self.scaler.state_dict(),
            "epoch": epoch + 1,
            "history": self.history,
            "best": self.best if math.isfinite(self.best) else None,
            "order_gen": self.order_gen.get_state(),
            "aug_gen": aug_states,
            "config": dict(self.config),
        }


def _setup(config: Mapping[str, Any], records: Sequence[SliceRecord], val_records: Sequence[SliceRecord], out_dir: str | Path,
           device: str, training_info: Optional[Mapping[str, Any]]) -> _Run:
    """Process group, determinism, data on the device, network, optimizer, scaler and generators."""
    rank, world, _ = _dist()
    dev = resolve_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = int(config["seed"])
    set_determinism(seed, bool(config["deterministic"]))
    train_data = prepare_records(records, config["model_input"], config["normalisation"]).to(dev)
    val_data = prepare_records(val_records, config["model_input"], config["normalisation"]).to(dev) if val_records else None
    torch.manual_seed(seed)  # same initial parameters on every rank and every run
    model = build_network(network_config(config)).to(dev)
    amp_dtype = mixed_precision(dev, bool(config["amp"]))
    info = {
        "name": config["name"],
        "config": dict(config),
        "data": sorted({r.source for r in records}),
        "train_cases": [r.case_id for r in records],
        "val_cases": [r.case_id for r in val_records],
        "seed": seed,
        "device": str(dev),
        "world_size": world,
        **dict(training_info or {}),
        "precision": str(amp_dtype).replace("torch.", "") if amp_dtype is not None else "float32",
    }
    return _Run(
        config=config, out=out, dev=dev, rank=rank, world=world, train_data=train_data, val_data=val_data,
        model=model, optimizer=build_optimizer(model, config["optimizer"]),
        # A loss scale only for fp16 (bf16 has fp32's range).
        scaler=torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16), amp_dtype=amp_dtype,
        order_gen=torch.Generator().manual_seed(seed),  # batch order: identical on all ranks
        aug_gen=torch.Generator(device=dev).manual_seed(seed * 1000 + 1 + rank), info=info,
    )


def _resume(run: _Run, path: Path) -> None:
    """Continue from a checkpoint written by :meth:`_Run.checkpoint`."""
    ck = torch.load(path, map_location=run.dev, weights_only=True)
    run.model.load_state_dict(ck["model"])
    run.optimizer.load_state_dict(ck["optimizer"])
    if ck.get("scaler"):  # checkpoints from before the scaler was saved have none
        run.scaler.load_state_dict(ck["scaler"])
    run.order_gen.set_state(ck["order_gen"])
    run.aug_gen.set_state(ck["aug_gen"][min(run.rank, len(ck["aug_gen"]) - 1)].to(run.aug_gen.get_state().device))
    run.start, run.history = int(ck["epoch"]), list(ck["history"])
    run.best = float(ck["best"]) if ck["best"] is not None else -math.inf


def train_step(run: _Run, net: torch.nn.Module, idx: torch.Tensor, phase: str) -> tuple[torch.Tensor, dict[str, float]]:
    """One optimisation step on the slices ``idx``: augment, forward (autocast), loss, scaled backward, clip, step."""
    config, data = run.config, run.train_data
    x, y, t = augment_batch(data.images[idx], data.labels[idx], data.trusted[idx], config["augmentation"], run.aug_gen)
    with torch.autocast(run.dev.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        # A BSN epoch's loss needs only the BSN's outputs: skip the decoder (about a third of a step).
        out = net(x, bsn_only=True) if phase == "bsn" else net(x)
    loss, parts = training_loss(out, y, t, phase, config["loss"])
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    clip = float(config["optimizer"]["grad_clip"] or 0)
    if clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    return loss, parts


def _end_of_epoch(run: _Run, row: dict[str, Any], epoch: int, last: bool, records: Sequence[SliceRecord]) -> None:
    """Validate when due (rank 0), export a new best, checkpoint when due, write the history."""
    config = run.config
    every = int(config["val_every"] or 0)
    new_best = False
    if run.val_data is not None and (last or (every and (epoch + 1) % every == 0)) and run.rank == 0:
        row["val_dice"] = canonical_dice(run.model, run.val_data, batch_size=max(int(config["batch_size"]), 4))
        if row["val_dice"] > run.best:
            run.best, new_best = row["val_dice"], True
    run.history.append(row)
    aug_states: list[torch.Tensor] = []
    if last or (epoch + 1) % max(1, int(config["checkpoint_every"])) == 0:
        aug_states = [run.aug_gen.get_state().cpu()]
        if run.ddp:  # every rank's augmentation stream, so a resumed DDP run continues each of them
            gathered: list[Any] = [None] * run.world
            torch.distributed.all_gather_object(gathered, aug_states[0])
            aug_states = gathered
    if run.rank == 0:
        if new_best:
            export_weights(run.model, run.out / "best", config, records, {**run.info, "epoch": epoch}, {"val_dice_model_grid": run.best})
        if aug_states:
            _atomic_save(run.checkpoint(epoch, aug_states), run.out / CHECKPOINT)
        (run.out / "history.json").write_text(json.dumps(json_ready(run.history), indent=1), encoding="utf-8")
    if run.ddp:
        torch.distributed.barrier()


def train(
    config: Mapping[str, Any],
    records: Sequence[SliceRecord],
    out_dir: str | Path,
    val_records: Sequence[SliceRecord] = (),
    *,
    resume: bool = False,
    device: str = "auto",
    progress: bool = True,
    training_info: Optional[Mapping[str, Any]] = None,
    max_steps: Optional[int] = None,
    stop_after_epochs: Optional[int] = None,
) -> RunResult:
    """Train on ``records`` (validate on ``val_records``) into ``out_dir``; see the module docstring.

    ``resume=True`` continues from ``out_dir/checkpoint.pt`` (epoch counter, parameters, optimizer,
    mixed-precision scaler and random-generator states), so an interrupted run ends with the same
    parameters as an uninterrupted one. ``max_steps`` stops after that many optimisation steps (timing
    measurements); ``stop_after_epochs`` stops (checkpointed, nothing exported) once the run has reached
    that epoch, counted from the run's start (not from a resume), as an interruption would (the
    learning-rate and phase schedule still follow ``config["epochs"]``).

    Steps: :func:`_setup`, :func:`_resume`, then per epoch the phase, :func:`train_step` per batch and
    :func:`_end_of_epoch` (validation, checkpoint), and last :func:`export_weights`.
    """
    run = _setup(config, records, val_records, out_dir, device, training_info)
    out, model = run.out, run.model
    if resume and (out / CHECKPOINT).exists():
        _resume(run, out / CHECKPOINT)
    elif resume and run.rank == 0:
        print(f"no checkpoint in {out}; starting from epoch 0", file=sys.stderr)
    has_bsn = model.bsn is not None
    epochs, batch_size = int(config["epochs"]), int(config["batch_size"])
    n = len(run.train_data)
    per_rank = max(1, n // run.world)
    steps_per_epoch = math.ceil(per_rank / batch_size)
    from tqdm import tqdm

    bar = tqdm(total=(epochs - run.start) * steps_per_epoch, disable=not (progress and run.rank == 0), unit="step",
               dynamic_ncols=True, desc=config["name"])
    wrapped: Optional[torch.nn.Module] = None
    wrapped_phase = None
    step_times: list[float] = []
    val_dice = run.history[-1].get("val_dice", math.nan) if run.history else math.nan
    model.train()
    stop = epochs if stop_after_epochs is None else min(epochs, stop_after_epochs)
    for epoch in range(run.start, stop):
        t0 = time.perf_counter()
        phase = phase_for_epoch(epoch, epochs, config["schedule"], has_bsn)
        apply_phase(model, run.optimizer, phase, epoch, epochs, float(config["optimizer"]["poly_power"]),
                    esnet_training_epochs(epochs, config["schedule"], has_bsn))
        if run.ddp and phase != wrapped_phase:
            # DDP records which parameters need gradients when it is built: rebuild it per phase.
            wrapped = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[run.dev.index] if run.dev.type == "cuda" else None, find_unused_parameters=True
            )
            wrapped_phase = phase
        net = wrapped if run.ddp else model
        perm = torch.randperm(n, generator=run.order_gen)
        perm = perm[: per_rank * run.world][run.rank::run.world] if n >= run.world else perm
        sums: dict[str, float] = {}
        for b in range(steps_per_epoch):
            ts = time.perf_counter()
            loss, parts = train_step(run, net, perm[b * batch_size : (b + 1) * batch_size].to(run.dev), phase)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(1)
            bar.set_postfix(epoch=epoch, phase=phase, loss=f"{float(loss.detach()):.3f}", val_dice=f"{val_dice:.3f}")
            if run.dev.type == "cuda":
                torch.cuda.synchronize(run.dev)
            step_times.append(time.perf_counter() - ts)
            if max_steps is not None and len(step_times) >= max_steps:
                bar.close()
                return RunResult(out, epoch, run.history, step_seconds=step_times)
        row: dict[str, Any] = {"epoch": epoch, "phase": phase, **{k: v / steps_per_epoch for k, v in sums.items()}}
        row["seconds"] = time.perf_counter() - t0
        _end_of_epoch(run, row, epoch, epoch == stop - 1, records)
        val_dice = row.get("val_dice", val_dice)
    bar.close()
    if stop < epochs:
        return RunResult(out, stop, run.history, step_seconds=step_times)
    best = run.best if math.isfinite(run.best) else math.nan
    result = RunResult(out, epochs, run.history, best_val_dice=best, step_seconds=step_times)
    if run.rank == 0:
        metrics = {"val_dice_model_grid": result.best_val_dice, "final_loss": run.history[-1].get("loss") if run.history else None}
        result.final_weights = export_weights(model, out / "final", config, records, {**run.info, "epoch": epochs - 1}, metrics)
        if (out / "best.json").exists():
            result.best_weights = out / "best.json"
    return result


def read_cv_reports(folders: Sequence[str | Path]) -> dict[str, Any]:
    """``{folder name: cv_metrics.json}`` of finished ``training.cv`` runs, to record with exported weights."""
    out: dict[str, Any] = {}
    for d in folders:
        path = Path(d) / "cv_metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"--cv-report {d}: no cv_metrics.json there (run python -m training.cv first)")
        out[Path(d).name] = json.loads(path.read_text(encoding="utf-8"))
    return out


def add_data_arguments(ap: argparse.ArgumentParser) -> None:
    """Arguments shared by ``train`` and ``cv``."""
    ap.add_argument("--config", default="bsesnet", help="config JSON path or name in training/configs (default bsesnet)")
    ap.add_argument("--data", nargs="*", default=[], help="data folders (manifest.csv + NIfTI pairs)")
    ap.add_argument("--pair", nargs="+", action="append", default=[], metavar="VOL SEG [K]", help="a volume, its .seg.nrrd and optional slice indices k (repeatable)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1 ...")
    ap.add_argument("--limit", type=int, default=None, help="read only the first N slices of each folder (smoke tests)")
    ap.add_argument("--folds", type=int, default=5, help="number of subject-wise folds (default 5)")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    over = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("seed", args.seed)) if v is not None}
    return load_config(args.config, **over)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0])
    add_data_arguments(ap)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--fold", type=int, default=None, help="train on all folds but K, validate on K")
    g.add_argument("--all", action="store_true", help="train on every slice (no validation; the default)")
    ap.add_argument("--splits", default=None, metavar="FILE",
                    help="with --fold: a CV's splits_final.json (or its folder) whose fold K to train")
    ap.add_argument("--benchmark-steps", type=int, default=None, help="time N steps, print seconds/epoch, exit")
    ap.add_argument("--cv-report", nargs="+", default=[], metavar="CV_DIR",
                    help="training.cv output folder(s) whose cv_metrics.json to record in the exported weights' config "
                    "(the cross-validation that stands for this configuration)")
    args = ap.parse_args(argv)
    config = config_from_args(args)
    info: dict[str, Any] = {"folds": None}
    if args.cv_report:  # checked before the (slow) data load
        try:
            info["cross_validation"] = read_cv_reports(args.cv_report)
        except FileNotFoundError as exc:
            ap.error(str(exc))
    records = load_sources(args.data, args.pair, limit=args.limit, dixon_in_phase=bool(config["dixon_in_phase"]))
    val: list[SliceRecord] = []
    if args.fold is not None:
        # The split of a CV when given (the very folds it scored), else the subject-wise split made here.
        folds = fold_indices(records, read_splits(args.splits)) if args.splits else subject_folds(records, args.folds, int(config["seed"]))
        if not 0 <= args.fold < len(folds):
            ap.error(f"--fold must be in 0..{len(folds) - 1}")
        val = [records[i] for i in folds[args.fold]]
        held = set(folds[args.fold])
        records = [r for i, r in enumerate(records) if i not in held]
        info["folds"] = {"k": len(folds), "fold": args.fold, "seed": int(config["seed"]), "by": "source/subject_id",
                         "splits": str(args.splits) if args.splits else None, "held_out_cases": [r.case_id for r in val]}
    if args.benchmark_steps:
        t0 = time.perf_counter()
        res = train(config, records, args.out, device=args.device, progress=False, max_steps=args.benchmark_steps + 1)
        step = sum(res.step_seconds[1:]) / max(1, len(res.step_seconds) - 1)  # first step = warm-up
        steps = math.ceil(len(records) / int(config["batch_size"]))
        print(json.dumps({"seconds_per_step": step, "steps_per_epoch": steps, "seconds_per_epoch": step * steps,
                          "prepare_and_build_seconds": time.perf_counter() - t0 - sum(res.step_seconds),
                          "slices": len(records), "threads": torch.get_num_threads(), "device": str(resolve_device(args.device))}))
        return 0
    if "cross_validation" in info:
        # A CV stands for these weights only if it ran with their configuration and slices; say so in the card.
        info["cross_validation"] = check_cv_reports(info["cross_validation"], config, records)
        for name, cv in info["cross_validation"].items():
            if not cv["matches_model"]:
                print(f"warning: --cv-report {name} does not describe these weights: {'; '.join(cv['mismatch'])} "
                      "(recorded, labelled as such)", file=sys.stderr)
    result = train(config, records, args.out, val, resume=args.resume, device=args.device, training_info=info)
    if _dist()[0] == 0:
        print(f"done: {result.epochs_done} epochs; weights {result.final_weights}"
              + (f"; best val Dice (model grid) {result.best_val_dice:.3f} → {result.best_weights}" if result.best_weights else ""))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
