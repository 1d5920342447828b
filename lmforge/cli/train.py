"""Training verbs: `train` (pretraining), `sft`, `dpo`, `rm` and `rl` (alignment); `--nproc` relaunches under torchrun."""

from __future__ import annotations

from typing import Annotated

import typer

from lmforge.cli.common import ConfigArgs, build_config, is_rank_zero, torchrun

Resume = Annotated[bool, typer.Option(help="continue from the run's latest complete checkpoint")]
Overwrite = Annotated[bool, typer.Option(
    help="replace what an earlier run left in the run dir (a different config, tokenizer or data)")]


def train(
    args: ConfigArgs = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    profile: Annotated[str | None, typer.Option(help="steps=A:B: torch profiler trace into RUN/profile/")] = None,
    nproc: Annotated[int | None, typer.Option(help="launch this many processes with torchrun (one node)")] = None,
    max_restarts: Annotated[int, typer.Option(help="--nproc: relaunches after a process dies")] = 0,
):
    """Pretrain a model: `lmforge train configs/pretrain-small.yaml data.dataset=DIR`.

    Several processes: `lmforge train CONFIG parallel.strategy=fsdp --nproc 8`, or
    `torchrun --nproc_per_node 8 -m lmforge train CONFIG parallel.strategy=fsdp`.
    """
    from lmforge.train import trainer
    from lmforge.train.config import TrainConfig

    config = build_config(TrainConfig, [*(args or []), *([f"train.profile={profile}"] if profile else [])])
    torchrun(nproc, max_restarts, config.parallel.strategy,
             ["train", *(args or []), *(["--resume"] if resume else []), *(["--overwrite"] if overwrite else []),
              *([f"--profile={profile}"] if profile else [])])
    result = trainer.run(config, resume=resume, overwrite=overwrite)
    summary = f"{result.status} at step {result.step}; run dir {result.run_dir}"
    if result.val_loss is not None:
        summary += f"; val loss {result.val_loss:.4f}, {result.val_bpb:.4f} bits/byte"
    if is_rank_zero():  # one summary per run
        typer.echo(summary)
    if result.signal is not None:
        raise typer.Exit(128 + result.signal)


def _align(kind: str, model: str, args: list[str] | None, resume: bool, nproc: int | None, overwrite: bool) -> None:
    from lmforge.align import run as align_run
    from lmforge.align.config import AlignConfig

    if kind == "rl":  # imported only here: it brings in the inference engine
        from lmforge.align.rl import RLConfig, run_rl
    config = build_config(RLConfig if kind == "rl" else AlignConfig, args, flags={"model": model}, base={"run": {"name": kind}})
    torchrun(nproc, 0, config.parallel.strategy,
             [kind, model, *(args or []), *(["--resume"] if resume else []), *(["--overwrite"] if overwrite else [])])
    runs = {"sft": align_run.run_sft, "dpo": align_run.run_dpo, "rm": align_run.run_rm}
    result = (run_rl if kind == "rl" else runs[kind])(config, resume=resume, overwrite=overwrite)
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.val_metrics.items() if not k.endswith("/stderr"))
    if is_rank_zero():  # one summary per run
        exported = f"; reward model {result.run_dir / align_run.REWARD_MODEL_DIR}" if kind == "rm" else ""
        typer.echo(f"{result.status} at step {result.step}; run dir {result.run_dir}{exported}" + (f"; {metrics}" if metrics else ""))
    if result.signal is not None:
        raise typer.Exit(128 + result.signal)


AlignNproc = Annotated[int | None, typer.Option(help="launch this many processes with torchrun (parallel.strategy=ddp|fsdp)")]


def sft(
    model: Annotated[str, typer.Argument(help="model to fine-tune: model dir, run dir or checkpoint")],
    args: ConfigArgs = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    nproc: AlignNproc = None,
):
    """Supervised fine-tuning on chat conversations: `lmforge sft MODEL configs/sft.yaml data.train=...`."""
    _align("sft", model, args, resume, nproc, overwrite)


def dpo(
    model: Annotated[str, typer.Argument(help="model to align: model dir, run dir or checkpoint")],
    args: ConfigArgs = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    nproc: AlignNproc = None,
):
    """Direct preference optimisation on chosen/rejected pairs: `lmforge dpo MODEL configs/dpo.yaml`."""
    _align("dpo", model, args, resume, nproc, overwrite)


def rm(
    model: Annotated[str, typer.Argument(help="model to start from: model dir, run dir or checkpoint")],
    args: ConfigArgs = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    nproc: AlignNproc = None,
):
    """Reward model (Bradley-Terry) on chosen/rejected pairs: `lmforge rm MODEL rm`; writes RUN/reward_model/."""
    _align("rm", model, args, resume, nproc, overwrite)


def rl(
    model: Annotated[str, typer.Argument(help="model to start from (usually an SFT run): model dir, run dir or checkpoint")],
    args: ConfigArgs = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    nproc: AlignNproc = None,
):
    """Reinforcement learning (GRPO) with verifiable rewards: `lmforge rl MODEL rl-arithmetic`.

    Rollouts run on lmforge's engine in the training process; `--nproc 2 parallel.strategy=ddp`
    splits each rollout batch's prompts over the processes."""
    _align("rl", model, args, resume, nproc, overwrite)
