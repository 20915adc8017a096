"""Run the retrieval service: ``python -m services.retrieval`` (settings from ``KNOWSERVE_RETRIEVAL_*``)."""

import sys

from services.common.server import run_main
from services.retrieval.config import RetrievalSettings
from services.retrieval.server import RetrievalApp

if __name__ == "__main__":
    sys.exit(run_main(RetrievalSettings(), RetrievalApp))
