"""The demo world: a generated, fictional knowledge base where "hallucination" is unambiguous.

Every entity is a made-up person with three checkable attributes (birthplace, occupation, instrument). The world
is split into pools that never share an entity:

* ``taught`` — facts the demo model is taught (it can answer them closed-book),
* ``kb_only`` — facts only the knowledge base holds (a closed-book answer about them is a guess),
* ``copy`` — entities used only in the cold-start transcripts that show the model how to search and copy an
  answer out of the inserted documents (never asked about in training or evaluation).

``taught`` and ``kb_only`` are each split by entity into ``train`` (the GRPO prompts) and ``heldout`` (never seen
by GRPO; the evaluation set). A question's gold answer is exact, so a wrong answer is a hallucination and an
"I don't know" is an abstention.

>>> w = build_world(entities_per_pool=8, seed=0)
>>> len(w.entities), len(w.questions("taught", "train")) > 0
(24, True)
>>> e = w.entities[0]
>>> e.statement("birthplace") in w.document(e)["text"]
True
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

ATTRIBUTES = ("birthplace", "occupation", "instrument")
QUESTIONS = {
    "birthplace": "Where was {name} born?",
    "occupation": "What does {name} do for a living?",
    "instrument": "Which instrument does {name} play?",
}
STATEMENTS = {
    "birthplace": "{name} was born in {value}.",
    "occupation": "{name} works as a {value}.",
    "instrument": "{name} plays the {value}.",
}
QUERIES = {"birthplace": "{name} birthplace", "occupation": "{name} occupation", "instrument": "{name} instrument"}
VALUES = {
    "birthplace": ["Velmora", "Ostrava Minor", "Quillhaven", "Marrowgate", "Tessaly", "Brindlemoor", "Caskwell",
                   "Dunmere", "Elsinport", "Fallowmere", "Gorsebrook", "Harrowfield", "Istervale", "Juniper Bay",
                   "Kestrelholm", "Lunaria"],
    "occupation": ["cartographer", "glassblower", "beekeeper", "astronomer", "locksmith", "bookbinder", "falconer",
                   "perfumer", "shipwright", "clockmaker", "cooper", "herbalist"],
    "instrument": ["cello", "oboe", "harp", "bassoon", "lute", "viola", "zither", "accordion", "marimba",
                   "trombone", "dulcimer", "piccolo"],
}
_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "qu", "r", "s", "st", "t", "th",
           "v", "w", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou"]
_CODAS = ["", "n", "r", "l", "s", "th", "m", "x", "nd", "rk"]
POOLS = ("taught", "kb_only", "copy")
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Entity:
    name: str
    pool: str  # taught | kb_only | copy
    split: str  # train | heldout (copy entities: train)
    birthplace: str
    occupation: str
    instrument: str

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)

    def statement(self, attribute: str) -> str:
        return STATEMENTS[attribute].format(name=self.name, value=self.value(attribute))


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    gold_answers: list[str]
    entity: str
    attribute: str
    pool: str
    split: str


def _name(rng: random.Random) -> str:
    def word(syllables: int) -> str:
        return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)

    return f"{word(rng.choice((1, 2))).capitalize()} {word(2).capitalize()}"


class World:
    """Entities, their corpus documents and question sets (see the module docstring)."""

    def __init__(self, entities: list[Entity], seed: int):
        self.entities = entities
        self.seed = seed

    def document(self, e: Entity) -> dict:
        """The knowledge-base document of one entity (the retrieval service's ``Document`` fields)."""
        return {"id": f"world-{e.name.lower().replace(' ', '-')}", "title": e.name,
                "text": " ".join(e.statement(a) for a in ATTRIBUTES), "source": "demo-world"}

    def corpus(self) -> list[dict]:
        """Every entity's document: the knowledge base holds all facts, taught or not."""
        return [self.document(e) for e in self.entities]

    def pool(self, pool: str, split: str | None = None) -> list[Entity]:
        return [e for e in self.entities if e.pool == pool and (split is None or e.split == split)]

    def questions(self, pool: str, split: str | None = None) -> list[Question]:
        return [Question(f"{e.name.lower().replace(' ', '-')}/{a}", QUESTIONS[a].format(name=e.name),
                         [e.value(a)], e.name, a, e.pool, e.split)
                for e in self.pool(pool, split) for a in ATTRIBUTES]

    def save(self, folder: Path) -> Path:
        """Write ``world.json``, ``corpus.jsonl`` and one question file per pool and split; returns ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "world.json").write_text(json.dumps({"seed": self.seed,
                                                       "entities": [asdict(e) for e in self.entities]}, indent=1))
        with open(folder / "corpus.jsonl", "w") as f:
            for doc in self.corpus():
                f.write(json.dumps(doc) + "\n")
        for pool in ("taught", "kb_only"):
            for split in SPLITS:
                with open(folder / f"questions_{pool}_{split}.jsonl", "w") as f:
                    for q in self.questions(pool, split):
                        f.write(json.dumps(asdict(q)) + "\n")
        return folder

    @classmethod
    def load(cls, folder: Path) -> "World":
        data = json.loads((folder / "world.json").read_text())
        return cls([Entity(**e) for e in data["entities"]], data["seed"])


def build_world(entities_per_pool: int = 60, heldout_fraction: float = 0.34, seed: int = 0) -> World:
    """A world with ``entities_per_pool`` entities in each of the three pools, names unique, values random.

    >>> w = build_world(entities_per_pool=6, seed=1)
    >>> sorted({e.pool for e in w.entities}), len({e.name for e in w.entities})
    (['copy', 'kb_only', 'taught'], 18)
    """
    if entities_per_pool < 2:
        raise ValueError("entities_per_pool must be at least 2 (one train and one held-out entity per pool)")
    if not 0 < heldout_fraction < 1:
        raise ValueError("heldout_fraction must be in (0, 1)")
    rng = random.Random(seed)
    names: list[str] = []
    seen_words: set[str] = set()
    while len(names) < entities_per_pool * len(POOLS):
        name = _name(rng)
        words = set(name.lower().split())
        if words & seen_words:  # every first and last name is unique: a name never half-matches another entity
            continue
        seen_words |= words
        names.append(name)
    entities = []
    heldout = max(1, round(entities_per_pool * heldout_fraction))
    for p, pool in enumerate(POOLS):
        for i, name in enumerate(names[p * entities_per_pool:(p + 1) * entities_per_pool]):
            split = "heldout" if pool != "copy" and i < heldout else "train"
            entities.append(Entity(name, pool, split, *(rng.choice(VALUES[a]) for a in ATTRIBUTES)))
    return World(entities, seed)
