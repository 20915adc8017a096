"""The trainer process of one run: ``python -m training.run RUN_DIR [--resume]`` (the training service spawns it).

Its state, progress and checkpoints are files in RUN_DIR, so the service (or a restarted one) reads them back;
SIGTERM stops after the current step with a checkpoint (resumable).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from training.loop import run_training
from training.runs import FAILED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.run")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    st = run_training(args.run_dir, resume=args.resume, progress_bar=False)
    return 1 if st.state == FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
