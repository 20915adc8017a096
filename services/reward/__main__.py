"""Run the reward service: ``python -m services.reward`` (settings from ``KNOWSERVE_REWARD_*``)."""

import sys

from services.common.server import run_main
from services.reward.config import RewardSettings
from services.reward.server import RewardApp

if __name__ == "__main__":
    sys.exit(run_main(RewardSettings(), RewardApp))
