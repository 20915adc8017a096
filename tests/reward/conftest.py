"""Reward fixtures: retrieval (with the hand-made facts) -> verification (lexical) -> reward, all in-process."""

from __future__ import annotations

import pytest

from tests.verification.conftest import KB


@pytest.fixture
async def reward_stack(start_retrieval, start_verification, start_reward):
    retrieval = await start_retrieval()
    await retrieval.client.upsert(KB)
    verification = await start_verification(retrieval_target=retrieval.server.address)
    reward = await start_reward(verification_target=verification.server.address)
    return retrieval, verification, reward
