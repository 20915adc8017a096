"""gRPC translation for the reward service: protos <-> :mod:`services.reward.core`."""

from __future__ import annotations

import asyncio

from knowserve.reward.v1 import reward_service_pb2 as pb
from knowserve.reward.v1 import reward_service_pb2_grpc as pb_grpc
from knowserve.verification.v1 import verification_service_pb2 as vpb
from services.common.errors import Unavailable
from services.common.server import ServiceApp, ServiceBinding
from services.reward.config import RewardSettings
from services.reward.core import FactResult, RewardCore, ScoreItem
from services.reward.recipes import Recipe, load_recipes
from services.verification.client import VerificationClient
from services.verification.core import VerifyItem

_KINDS = {vpb.ANSWER_KIND_CLAIMS: "claims", vpb.ANSWER_KIND_EMPTY: "empty", vpb.ANSWER_KIND_REFUSAL: "refusal",
          vpb.ANSWER_KIND_NO_CLAIMS: "no_claims"}


def recipe_to_proto(r: Recipe) -> pb.Recipe:
    return pb.Recipe(name=r.name, version=r.version, combine=r.combine, description=r.description,
                     components=[pb.RecipeComponent(name=c.name, weight=c.weight,
                                                    params={k: str(v) for k, v in c.params.items()})
                                 for c in r.components])


def recipe_spec_from_proto(spec: pb.Recipe) -> dict | None:
    if not spec.name and not spec.components:
        return None
    return {"name": spec.name, "version": spec.version, "combine": spec.combine, "description": spec.description,
            "components": [{"name": c.name, "weight": c.weight, "params": dict(c.params)} for c in spec.components]}


class RewardServicer(pb_grpc.RewardServiceServicer):
    def __init__(self, app: "RewardApp"):
        self.app = app

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        items = [ScoreItem(it.prompt, it.completion, list(it.gold_answers), dict(it.metadata))
                 for it in request.items]
        recipe, scores = await self.app.require_core().score(request.recipe,
                                                             recipe_spec_from_proto(request.recipe_spec), items)
        return pb.ScoreResponse(recipe=recipe.name, recipe_version=recipe.version, scores=[
            pb.ItemScore(total=s.total, components=[
                pb.ComponentScore(name=c.name, value=c.value, applicable=c.applicable, detail=c.detail,
                                  weight=c.weight) for c in s.components])
            for s in scores])

    async def ListRecipes(self, request, context) -> pb.ListRecipesResponse:
        core = self.app.require_core()
        return pb.ListRecipesResponse(recipes=[recipe_to_proto(r) for r in core.recipes.values()])


class RewardApp(ServiceApp):
    """The reward service: recipes loaded and validated, verification client opened, then SERVING."""

    def __init__(self, settings: RewardSettings):
        self.settings = settings
        self.core: RewardCore | None = None
        self.verification: VerificationClient | None = None
        self.generation = None
        self.bindings = [ServiceBinding(pb.DESCRIPTOR.services_by_name["RewardService"].full_name,
                                        pb_grpc.add_RewardServiceServicer_to_server, RewardServicer(self))]

    def require_core(self) -> RewardCore:
        if self.core is None:
            raise Unavailable("reward is starting: recipes are loading (health is NOT_SERVING)")
        return self.core

    async def startup(self) -> None:
        s = self.settings
        recipes = await asyncio.to_thread(load_recipes, s.recipes_dir)
        self.verification = VerificationClient(s.verification_target, s.client_options(
            "verification", timeout_seconds=s.verification_timeout_seconds, retries=s.verification_retries))
        client = self.verification

        async def factuality(completions, section, judge, gamma, top_k, topics):
            reply = await client.verify([VerifyItem(answer=c, topic=t, section=section)
                                         for c, t in zip(completions, topics)],
                                        judge=judge, gamma=gamma, evidence_top_k=top_k)
            out = []
            for r in reply.results:
                kind = _KINDS.get(r.kind, "unknown")
                if kind == "claims":
                    out.append(FactResult(r.length_penalized_score, f"{r.supported}/{len(r.claims)} claims supported, "
                                          f"{r.refuted} refuted ({reply.judge})"))
                else:
                    out.append(FactResult(None, f"not applicable: {section} section is {kind.replace('_', ' ')}"))
            return out

        llm_generate = None
        if s.generation_target:
            from services.generation.client import GenerationClient

            self.generation = GenerationClient(s.generation_target, s.client_options(
                "generation", timeout_seconds=s.generation_timeout_seconds, retries=s.generation_retries),
                s.generation_app_name,
                model=s.generation_model, internal=True)
            llm_generate = self.generation.greedy

        self.core = RewardCore(s, recipes, factuality, llm_generate)

    async def shutdown(self) -> None:
        if self.verification is not None:
            await self.verification.close()
        if self.generation is not None:
            await self.generation.close()
