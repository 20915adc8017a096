"""Run the training service: ``python -m services.training`` (settings from ``KNOWSERVE_TRAINING_*``)."""

import sys

from services.common.server import run_main
from services.training.config import TrainingSettings
from services.training.server import TrainingApp

if __name__ == "__main__":
    sys.exit(run_main(TrainingSettings(), TrainingApp))
