"""Run the answer service: ``python -m services.answer`` (settings from ``KNOWSERVE_ANSWER_*``)."""

import sys

from services.answer.config import AnswerSettings
from services.answer.server import AnswerApp
from services.common.server import run_main

if __name__ == "__main__":
    sys.exit(run_main(AnswerSettings(), AnswerApp))
