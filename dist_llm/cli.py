"""`dist-llm <stage>`: run one stage of the registry (dist_llm/stages.py), or submit one as a job
(`dist-llm submit`). Builds the command line from the registry, maps errors to exit codes."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

from dist_llm import signals
from dist_llm.errors import PREEMPTED_EXIT, Preempted, tell_launcher
from dist_llm.launch.submit import SUBMIT
from dist_llm.launch.torchrun import LAUNCH
from dist_llm.stages import STAGES, add_stages


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-llm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    add_stages(parser, (*STAGES, SUBMIT, LAUNCH))
    return parser


def user_errors() -> tuple[type[Exception], ...]:
    """Errors printed as one `error:` line with exit status 2. Imported only once the arguments
    are parsed: data.manifest imports webdataset (~2 s), which `dist-llm --help` need not wait for."""
    from dist_llm.config import ConfigError
    from dist_llm.data.documents import InputError
    from dist_llm.data.manifest import DataError
    from dist_llm.errors import CheckpointError, TrainingDiverged

    return ConfigError, InputError, DataError, CheckpointError, TrainingDiverged


# Under torchrun the other ranks wait this long before they exit with rank 0's status, so that
# rank 0 has printed the error before torchrun stops the workers.
QUIET_RANK_DELAY_S = 1.0


def user_error(message: str) -> None:
    """Printed once: under torchrun every rank meets the same check, so only rank 0 prints it. The
    others leave it in their torchrun error file (TORCHELASTIC_ERROR_FILE), where torchrun's
    summary and `dist-llm launch` show it: an error only one rank meets (a file missing on one
    node) is not lost. Without such a file (the deepspeed launcher) every rank prints it."""
    tell_launcher(message)
    if os.environ.get("RANK", "0") != "0" and os.environ.get("TORCHELASTIC_ERROR_FILE"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun stopping it: nothing to say
        time.sleep(QUIET_RANK_DELAY_S)
        return
    print(message, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher appends --local_rank=N; the same value is in $LOCAL_RANK.
    argv = [a for a in argv if not a.startswith(("--local_rank=", "--local-rank="))]
    args = build_parser().parse_args(argv)
    if args.stage_def.distributed:  # a preemption signal during the imports to come is kept
        signals.record_early()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    errors = user_errors()
    # A training run saves and stops at a step boundary on these signals (train/preemption.py);
    # any other stage stops at once, without leaving partial output.
    terminate = contextlib.nullcontext() if args.stage_def.distributed else signals.unwind_on_terminate()
    try:
        with terminate:
            args.stage_def.run(args)
    except errors as exc:
        user_error(f"error: {exc}")
        code = 2
    except Preempted as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        code = PREEMPTED_EXIT
    except signals.Terminated as exc:
        print(f"stopped: {exc}; any output folder is as it was before this command", file=sys.stderr)
        code = 128 + getattr(signal, str(exc)).value
    else:
        code = 0
    # Only a stage that trained in this process (train, distill, dpo, or any through submit's
    # debug cluster) starts a process group; end such a process without interpreter teardown.
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_initialized():
            from dist_llm.distributed import finish_process

            finish_process(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
