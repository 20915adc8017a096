"""Run the verification service: ``python -m services.verification`` (settings from ``KNOWSERVE_VERIFICATION_*``)."""

import sys

from services.common.server import run_main
from services.verification.config import VerificationSettings
from services.verification.server import VerificationApp

if __name__ == "__main__":
    sys.exit(run_main(VerificationSettings(), VerificationApp))
