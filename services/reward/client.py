"""Typed async client of the reward service (used by the trainer, the TRL adapter and tests)."""

from __future__ import annotations

from collections.abc import Sequence

from knowserve.reward.v1 import reward_service_pb2 as pb
from knowserve.reward.v1 import reward_service_pb2_grpc as pb_grpc
from services.common.clients import ClientOptions, ServiceClient
from services.reward.core import ScoreItem


class RewardClient(ServiceClient[pb_grpc.RewardServiceStub]):
    """``await RewardClient("127.0.0.1:50053").score("knowrl", [ScoreItem(prompt, completion, ["Paris"])])``"""

    def __init__(self, target: str, options: ClientOptions | None = None):
        super().__init__("reward", target, pb_grpc.RewardServiceStub, options)

    async def score(self, recipe: str, items: Sequence[ScoreItem], recipe_spec: pb.Recipe | None = None,
                    timeout: float | None = None) -> pb.ScoreResponse:
        request = pb.ScoreRequest(recipe=recipe, recipe_spec=recipe_spec, items=[
            pb.ScoreItem(prompt=i.prompt, completion=i.completion, gold_answers=list(i.gold_answers),
                         metadata=dict(i.metadata)) for i in items])
        return await self.call("Score", request, timeout=timeout)

    async def list_recipes(self) -> pb.ListRecipesResponse:
        return await self.call("ListRecipes", pb.ListRecipesRequest())
