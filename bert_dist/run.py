"""Entry point: `accelerate launch bert_dist/run.py --task sst2 [--init DIR|hub-id|scratch] ...`.

Flags -> RunConfig, console, Accelerator, output directory, then the recipe for the task.
User errors (bad flags, data, checkpoints) end in one clear line and exit status 1.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from bert_dist.config import RunConfig, config_from_args
from bert_dist.console import fail, print_table, setup_logging

log = logging.getLogger("bert_dist")


def prepare_output_dir(cfg: RunConfig, accelerator) -> Path:
    """runs/<task>-<timestamp> by default (one name for all processes); refuse to clobber a finished run."""
    from accelerate.utils import broadcast_object_list

    name = [cfg.output_dir or f"runs/{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}"]
    broadcast_object_list(name)
    out = Path(name[0])
    resuming = cfg.train.resume or cfg.train.resume_from
    if out.exists() and any(out.iterdir()) and not (cfg.overwrite or resuming):
        raise ValueError(f"--output-dir {out} is not empty; pass --overwrite to reuse it or --resume to continue")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite and not resuming:
            for stale in ("metrics.jsonl", "results.json"):
                (out / stale).unlink(missing_ok=True)
        (out / "run_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    accelerator.wait_for_everyone()
    return out


def main(argv: list[str] | None = None) -> int:
    is_main = os.environ.get("RANK", "0") == "0"
    try:
        cfg = config_from_args(argv)
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        if cfg.smoke:
            from bert_dist.data.synthetic import smoke_config

            cfg = smoke_config(cfg)
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.train.grad_accum,
            log_with=cfg.report_to,
        )
        is_main = accelerator.is_main_process
        setup_logging(is_main)
        set_seed(cfg.seed)
        out_dir = prepare_output_dir(cfg, accelerator)
        if cfg.report_to:
            accelerator.project_configuration.set_directories(str(out_dir))
            accelerator.init_trackers(out_dir.name, config=_flat(cfg.to_dict()))
        log.info("%s on %d process(es), %s, mixed precision %s -> %s", cfg.task, accelerator.num_processes,
                 accelerator.device, accelerator.mixed_precision, out_dir)
        if cfg.task in ("pretrain", "tokenizer"):
            from bert_dist.pretrain import run_pretrain as recipe
        else:
            from bert_dist.finetune import run_finetune as recipe
        results = recipe(cfg, accelerator, out_dir)
        if is_main:
            (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            print_table(f"{cfg.task} results", {"final": {k: v for k, v in results.items()
                                                           if isinstance(v, (int, float))}})
        accelerator.end_training()
        return 0
    except ValueError as e:  # user errors: bad flags, data, checkpoints
        if os.environ.get("BERT_DIST_DEBUG"):
            raise
        if is_main:
            fail(str(e))
        sys.exit(1)
    except RuntimeError as e:
        from bert_dist.train import TrainingDiverged

        if not isinstance(e, TrainingDiverged):
            raise
        if is_main:
            fail(str(e))
        sys.exit(1)
    except KeyboardInterrupt:
        if is_main:
            fail("interrupted")
        sys.exit(130)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif v is not None:
            out[prefix + k] = v
    return out


if __name__ == "__main__":
    sys.exit(main())
