"""Training fixtures: a small demo world with its cold-started model (built once, cached by code hash), and the
whole stack around the session's Ray Serve generation app — retrieval (on the port generation searches), lexical
verification, reward, and the training service, all real gRPC servers."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from services.retrieval.core import Document
from services.reward.client import RewardClient
from services.reward.config import RewardSettings
from services.reward.server import RewardApp
from services.training.client import TrainingClient
from services.training.config import TrainingSettings
from services.training.server import TrainingApp
from tests.conftest import ROOT, SERVE_APP, InProcessService


@pytest.fixture(scope="session")
def demo_world_model():
    """(world, world folder, model folder): 12 entities per pool and a 250-step cold start (~1 min on 2 cores),
    cached under .cache/test-demo-model/<hash of the recipe and its code>."""
    from training.demo_model import SftConfig, train_demo_model
    from training.world import build_world

    cfg = SftConfig(steps=250, threads=2)
    code = b"".join((ROOT / f).read_bytes() for f in ("training/world.py", "training/demo_model.py"))
    key = hashlib.sha256(repr(sorted(asdict(cfg).items())).encode() + code).hexdigest()[:12]
    out = ROOT / ".cache/test-demo-model" / key
    world = build_world(entities_per_pool=12, seed=0)
    if not (out / "model" / "config.json").exists():
        world.save(out / "world")
        train_demo_model(world, out / "model", cfg, progress=False)
    return world, out / "world", out / "model"


@dataclass
class TrainingStack:
    retrieval: InProcessService
    verification: InProcessService
    reward: InProcessService
    training: InProcessService
    generation_target: str
    checkpoint_root: Path
    model: Path  # the demo model, copied under generation's checkpoint root
    world: object
    starter: object  # starts (and at the end stops) more in-process services

    @property
    def client(self) -> TrainingClient:
        return self.training.client


async def start_reward(starter, verification_target: str, port: int = 0) -> InProcessService:
    settings = RewardSettings(port=port, metrics_port=0, verification_target=verification_target,
                              generation_target="", verification_retries=0)
    return await starter.start(InProcessService(settings, RewardApp(settings), RewardClient))


@pytest.fixture
async def training_stack(serve_generation, generation_retrieval_port, demo_world_model, start_retrieval,
                         start_verification, starter, tmp_path):
    target, checkpoint_root, _ = serve_generation
    world, world_dir, model = demo_world_model
    retrieval = await start_retrieval(port=generation_retrieval_port, dense=False, default_mode="bm25")
    await retrieval.client.upsert([Document(**d) for d in world.corpus()])
    verification = await start_verification(retrieval_target=retrieval.server.address)
    reward = await start_reward(starter, verification.server.address)
    served = checkpoint_root / f"demo-{uuid.uuid4().hex[:8]}"
    shutil.copytree(model, served)
    settings = TrainingSettings(port=0, metrics_port=0, runs_dir=tmp_path / "runs", eval_dir=tmp_path / "eval",
                                checkpoint_root=checkpoint_root, generation_target=target,
                                generation_app_name=SERVE_APP, reward_target=reward.server.address,
                                retry_seconds=120, max_progress_poll_seconds=0.2)
    training = await starter.start(InProcessService(settings, TrainingApp(settings), TrainingClient))
    old = os.environ.get("KNOWSERVE_WORLD_DIR")
    os.environ["KNOWSERVE_WORLD_DIR"] = str(world_dir)  # the trainer process reads the demo world from here
    yield TrainingStack(retrieval, verification, reward, training, target, checkpoint_root, served, world,
                        starter)
    if old is None:
        os.environ.pop("KNOWSERVE_WORLD_DIR", None)
    else:
        os.environ["KNOWSERVE_WORLD_DIR"] = old
