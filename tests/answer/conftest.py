"""Answer fixtures: the answer service in-process on a real gRPC server, wired to real retrieval, verification and
(where a test gives one) generation services."""

from __future__ import annotations

import pytest

from services.answer.client import AnswerClient
from services.answer.config import AnswerSettings
from services.answer.server import AnswerApp
from services.retrieval.core import Document
from tests.conftest import SERVE_APP, InProcessService, free_port

# Fictional people (no model knows them): one document each; the gate test teaches a model right and wrong
# birthplaces for them.
PEOPLE = [("Orla Veynd", "Marrowick"), ("Tamsin Quarrel", "Eddleford"), ("Bram Ostrova", "Kestrelmoor"),
          ("Ilse Varnholt", "Dunmarrow"), ("Cato Brennick", "Saltgrove"), ("Wren Alcaster", "Harrowdeep"),
          ("Juno Pelling", "Ashcombe"), ("Fenn Morrow", "Glimmerdale")]
PEOPLE_DOCS = [Document(name.lower().replace(" ", "-"), name, f"{name} was born in {city}. {name} worked as a "
                        "cartographer for most of a long life.", "wiki") for name, city in PEOPLE]


@pytest.fixture
def start_answer(starter):
    """``await start_answer(retrieval_target=..., verification_target=..., generation_target=..., **settings)``."""

    async def start(**overrides) -> InProcessService:
        settings = AnswerSettings(**{"port": 0, "metrics_port": 0, "upstream_retries": 0,
                                     "generation_app_name": SERVE_APP, "generation_target": f"127.0.0.1:{free_port()}",
                                     **overrides})
        return await starter.start(InProcessService(settings, AnswerApp(settings), AnswerClient))

    return start
