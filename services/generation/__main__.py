"""Run the generation service: ``python -m services.generation`` (a local Ray head + the Serve application;
settings from ``KNOWSERVE_GENERATION_*``)."""

import sys

from services.generation.deploy import main

if __name__ == "__main__":
    sys.exit(main())
