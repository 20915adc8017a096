"""``make demo`` / ``knowserve demo``: start the local stack on the embedded default (retrieval, verification,
reward), ingest the Wikipedia demo corpus, then show retrieval, a knowledge edit winning over the stale fact,
claim-level verification of a right and a hallucinated answer, and their KnowRL rewards.

Then the served model (SmolLM2-135M-Instruct on Ray Serve) answers questions closed-book and with retrieved
passages, and the verifier checks every claim; the answer service turns that into grounded answers for users:
cited when supported, refused (citing what was found) when not, and changed by a knowledge edit at once.

Then the loop that makes knowserve more than its parts, on the **demo world** (a generated fictional knowledge
base, so a wrong answer is unambiguously a hallucination): a small model the demo builds for itself is
hot-swapped into generation, evaluated, trained with GRPO through the services (rollouts from generation with
retrieval inside generation, KnowRL rewards from reward + verification, new weights hot-swapped into generation
after every step), and evaluated again: a before/after table and a chart. Simulated users ask the demo model
all along; the answer service verifies their answers live, so the live hallucination rate of every weight version
is shown, and a hallucination-gated swap of the pre-GRPO weights is decided on that traffic.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from services import stack
from services.common.progress import console as make_console
from services.generation.config import DEFAULT_MODEL, DEMO_MODEL
from services.retrieval.client import RetrievalClient
from services.retrieval.core import Document
from services.retrieval.demo_corpus import build_wiki_corpus
from services.retrieval.ingest import ingest_through_service
from services.reward.client import RewardClient
from services.reward.core import ScoreItem
from services.verification.client import VerificationClient
from services.verification.core import VerifyItem

QUESTION = "Who directed 2001: A Space Odyssey, and when was it released?"
ANSWERS = {
    "grounded": "<think>2001: A Space Odyssey is a 1968 film. It was directed by Stanley Kubrick, who co-wrote the "
                "screenplay with Arthur C. Clarke.</think><answer>Stanley Kubrick</answer>",
    "hallucinated": "<think>2001: A Space Odyssey is a 1972 film. It was directed by Steven Spielberg, who co-wrote "
                    "the screenplay with Arthur C. Clarke.</think><answer>Steven Spielberg</answer>",
    "refusal": "<think>I am not certain who made this film.</think><answer>I don't know</answer>",
}


# Leads the demo ingests (embedding all 10,032 for hybrid search takes 4-10 min on 2 cores; the demo keeps to its
# time budget with a subset that holds every article its questions need). KNOWSERVE_DEMO_WIKI_DOCS=0: all.
WIKI_DOCS = int(os.environ.get("KNOWSERVE_DEMO_WIKI_DOCS", "2500"))
NEEDED_TITLES = {"2001: A Space Odyssey", "Stanley Kubrick", "Australia", "Canberra", "Mount Everest", "Mars",
                 "Odyssey", "Space exploration"}


def demo_subset(full: Path, n: int) -> tuple[Path, int]:
    """(corpus file, documents in it): the first ``n`` leads plus every article the demo's questions need."""
    if n <= 0:
        return full, sum(1 for _ in full.open())
    out = full.with_name(f"wiki-{n}.jsonl")
    lines = full.read_text().splitlines()
    keep = [line for i, line in enumerate(lines) if i < n or json.loads(line)["title"] in NEEDED_TITLES]
    if not out.exists():
        out.write_text("\n".join(keep) + "\n")
    return out, len(keep)


def run_demo() -> int:
    console = make_console()
    console.rule("1. start the stack")
    procs = stack.up()
    target = procs["retrieval"].target
    full = stack.run_dir() / "data" / "wiki.jsonl"
    if not full.exists():
        console.rule("2. build the demo corpus (Wikipedia leads, CC BY-SA 4.0)")
        console.print(f"{build_wiki_corpus(full)} documents -> {full}")
    corpus, size = demo_subset(full, WIKI_DOCS)

    async def run() -> None:
        async with RetrievalClient(target) as client:
            stats = await client.stats()
            if stats.documents < size:
                console.rule("3. ingest it through the retrieval service")
                t0 = time.monotonic()
                report = await ingest_through_service(corpus, client)
                console.print(f"ingested {report.documents} documents / {report.passages} passages "
                              f"in {time.monotonic() - t0:.0f}s")
            stats = await client.stats()
            console.print(f"index: {stats.documents} documents, {stats.passages} passages, "
                          f"dense={stats.dense_enabled}, {stats.index_size_bytes / 1e6:.0f} MB")
            console.rule("4. search (hybrid BM25 + MiniLM)")
            question = "Who directed 2001: A Space Odyssey?"
            for p in (await client.search([question], top_k=3))[0]:
                console.print(f"  [{p.score:.3f}] {p.title}: {p.text[:110]}…")
            console.rule("5. a knowledge edit wins over the stale fact on the very next search")
            await client.upsert([Document("edit:demo-kubrick", "2001: A Space Odyssey",
                                          "2001: A Space Odyssey was directed by the demo editor, "
                                          "according to this knowledge edit.", "edit")])
            top = (await client.search([question], top_k=1))[0][0]
            console.print(escape(f"  top hit now: [{top.source}] {top.text}"))
            await client.delete(["edit:demo-kubrick"])
            top = (await client.search([question], top_k=1))[0][0]
            console.print(escape(f"  after `knowserve edit rm`: [{top.source}] {top.title}: {top.text[:90]}…"))

    asyncio.run(run())
    asyncio.run(show_verification_and_reward(console, procs["verification"].target, procs["reward"].target))
    if "generation" in procs:
        asyncio.run(show_model_hallucination(console, procs["generation"].target, procs["verification"].target,
                                             target))
    if "answer" in procs and "generation" in procs:
        from services.demo_live import show_grounded_answers

        console.rule("9. grounded answers for users (answer service): retrieve -> generate -> verify every claim")
        asyncio.run(show_grounded_answers(console, procs["answer"].target, target))
    if "generation" in procs and "training" in procs:
        demo_world_loop(console, procs)
    console.rule("done")
    prom = os.environ.get("KNOWSERVE_STACK_PROMETHEUS_PORT", "9090")
    console.print(f"Monitoring: Prometheus at http://127.0.0.1:{prom} scrapes every service with the knowserve rules "
                  "(try knowserve:reward_hallucination_rate:ratio_rate10m, knowserve_eval_answers_ratio, "
                  "knowserve_training_reward); the Grafana dashboards are in deploy/grafana/dashboards/ (import them "
                  "with a Prometheus data source) and ship in the Helm chart.")
    console.print("The stack keeps running: try `.venv/bin/knowserve search \"capital of Australia\"`, "
                  "`.venv/bin/knowserve verify \"Canberra is the capital of Australia.\"`, "
                  "`.venv/bin/knowserve status`, then `.venv/bin/knowserve down` (or `make down`).")
    return 0


async def show_verification_and_reward(console: Console, verification: str, reward: str) -> None:
    from knowserve.verification.v1 import verification_service_pb2 as vpb

    console.rule("6. verification: split each answer's <think> into claims, fetch evidence, judge each claim")
    async with VerificationClient(verification) as v, RewardClient(reward) as r:
        reply = await v.verify([VerifyItem(answer=a, section="think") for a in ANSWERS.values()], judge="lexical")
        for name, res in zip(ANSWERS, reply.results):
            kind = vpb.AnswerKind.Name(res.kind).removeprefix("ANSWER_KIND_").lower()
            console.print(f"[bold]{name}[/bold] ({kind}): FActScore {res.factscore:.2f}, "
                          f"supported {res.supported} / refuted {res.refuted} / unverifiable {res.not_enough_info}")
            for c in res.claims:
                label = vpb.Label.Name(c.label).removeprefix("LABEL_")
                style = {"SUPPORTED": "green", "REFUTED": "red"}.get(label, "yellow")
                console.print(escape(f"    {c.text}  ") + f"[{style}]{label}[/{style}] {list(c.evidence_ids)}")
        console.rule("7. reward: the KnowRL recipe (format + correctness with refusal + factuality)")
        scored = await r.score("knowrl", [ScoreItem(QUESTION, a, ["Stanley Kubrick"]) for a in ANSWERS.values()])
        for name, s in zip(ANSWERS, scored.scores):
            parts = ", ".join(f"{c.name} {c.value:+.2f}" if c.applicable else f"{c.name} n/a" for c in s.components)
            console.print(f"  {name:13s} total {s.total:+.2f}   ({parts})")


MODEL_QUESTIONS = [("Who directed the film 2001: A Space Odyssey?", ["Stanley Kubrick", "Kubrick"]),
                   ("What is the capital of Australia?", ["Canberra"]),
                   ("What is the highest mountain on Earth above sea level?", ["Mount Everest", "Everest"]),
                   ("Which planet is known as the Red Planet?", ["Mars"])]


async def show_model_hallucination(console: Console, generation: str, verification: str, retrieval: str) -> None:
    """Answers of the served model, closed-book and with retrieved passages, graded against gold answers and
    checked claim by claim."""
    from knowserve.verification.v1 import verification_service_pb2 as vpb
    from services.common.grading import CORRECT, NOT_ATTEMPTED, GradeOptions, grade
    from services.generation.client import GenerationClient

    console.rule("8. the served model answers closed-book, then with retrieved passages; every claim is checked")
    async with GenerationClient(generation) as g, VerificationClient(verification) as v, \
            RetrievalClient(retrieval) as rc:
        info = await g.model_info()
        console.print(f"model: {info.model_name} ({info.architecture}, {info.engine}), weight version "
                      f"{info.weight_version}, {info.replicas} Serve replica(s)")
        hits = await rc.search([q for q, _ in MODEL_QUESTIONS], top_k=2)
        for mode in ("closed-book", "with retrieval"):
            chats = []
            for (q, _), passages in zip(MODEL_QUESTIONS, hits):
                context = "" if mode == "closed-book" else "Use these passages:\n" + "\n".join(
                    f"- {p.title}: {p.text[:400]}" for p in passages) + "\n\n"
                chats.append([{"role": "user", "content": f"{context}{q} Answer in one short sentence."}])
            reply = await g.generate(chats, temperature=0, max_tokens=40, timeout=600)
            answers = [c.text.strip() for c in reply.completions]
            verdicts = await v.verify([VerifyItem(answer=a) for a in answers], judge="lexical")
            attempted = wrong = 0
            console.print(f"[bold]{mode}[/bold]")
            for (q, gold), a, r in zip(MODEL_QUESTIONS, answers, verdicts.results):
                graded = grade(a, gold, options=GradeOptions("answer_tag_or_text", "cover"))
                refused, right = graded == NOT_ATTEMPTED, graded == CORRECT
                attempted += not refused
                wrong += (not refused) and not right
                labels = ", ".join(vpb.Label.Name(c.label).removeprefix("LABEL_").lower() for c in r.claims)
                mark = ("[green]correct[/green]" if right else "[yellow]refused[/yellow]" if refused
                        else "[red]wrong[/red]")
                console.print(escape(f"  Q: {q}\n     A: {a}") + f"\n     {mark}; claims: {labels or '-'}")
            rate = wrong / attempted if attempted else 0.0
            console.print(f"  {mode}: hallucination rate among attempted answers {rate:.0%} ({wrong}/{attempted})")


DEMO_WORLD_ENTITIES = 40  # per pool: taught, kb_only, copy


def demo_world_loop(console: Console, procs: dict) -> None:
    """Steps 10-14: the demo world, its model, evaluation, GRPO through the services with hot-swaps (users asking
    all along, verified live), evaluation, and a hallucination-gated swap decided on that live traffic."""
    from rich.table import Table

    from training.demo_model import SftConfig, train_demo_model
    from training.eval import EvalConfig, evaluate
    from training.world import World, build_world

    run_dir = stack.run_dir()
    world_dir, model_dir = run_dir / "world", run_dir / "models" / "demo-world"
    console.rule("10. the demo world: a fictional knowledge base, and a small model that knows only part of it")
    if (world_dir / "world.json").exists():
        world = World.load(world_dir)
    else:
        world = build_world(entities_per_pool=DEMO_WORLD_ENTITIES)
        world.save(world_dir)
    taught, kb_only = world.pool("taught"), world.pool("kb_only")
    console.print(f"{len(world.entities)} people with a birthplace, an occupation and an instrument: the model is "
                  f"taught {len(taught)}; {len(kb_only)} live only in the knowledge base; held-out people "
                  "(never seen by GRPO) are the evaluation set. e.g. " + escape(world.document(kb_only[0])["text"]))

    async def ingest() -> None:
        async with RetrievalClient(procs["retrieval"].target) as rc:
            await rc.upsert([Document(**d) for d in world.corpus()])

    asyncio.run(ingest())
    if not (model_dir / "config.json").exists():
        console.print("cold start (supervised): taught facts closed-book; on unfamiliar names, searching and "
                      "copying the answer from the documents - but guessing more often than searching")
        stats = train_demo_model(world, model_dir, SftConfig())
        console.print(f"demo model: {stats['parameters']:,} parameters, loss {stats['final_loss']:.3f} after "
                      f"{stats['steps']} steps ({stats['seconds']:.0f}s)")
    run_id = f"demo-world-{time.strftime('%Y%m%d-%H%M%S')}"
    start, version, seconds = publish_start(procs, model_dir, run_id, DEMO_MODEL)
    console.print(f"hot-swapped the cold-started model into the served model {DEMO_MODEL!r} as weight version "
                  f"{version} ({seconds:.2f}s, no restart; {DEFAULT_MODEL} keeps serving users beside it)")

    def evaluate_both(label: str) -> list[dict]:
        out = []
        for ds in ("demo_world:kb_only:heldout", "demo_world:taught:heldout"):
            cfg = EvalConfig(dataset=ds, mode="retrieval", match="exact", label=label, model=DEMO_MODEL,
                             generation_target=procs["generation"].target,
                             verification_target=procs["verification"].target)
            r = asyncio.run(evaluate(cfg, progress=False))
            out.append(r)
            support = "-" if r["claim_support"] is None else f"{r['claim_support']:.0%}"
            console.print(f"  {ds.split(':')[1]:8s} v{r['weight_version']}: correct {r['correct']:.0%}, "
                          f"hallucinated {r['incorrect']:.0%} ({r['incorrect_cut_off']:.0%} cut off by a limit), "
                          f"abstained {r['not_attempted']:.0%}; claim support "
                          f"{support}, AP {r['ap']:.2f}, searched {r['search_rate']:.0%} ({r['n']} questions)")
        return out

    console.rule("11. evaluate it on held-out people (the search tool is available; the model decides)")
    before = evaluate_both("before")
    traffic = None
    if "answer" in procs:
        from services.demo_live import LiveTraffic
        from training.data import load_dataset
        from training.prompts import render_prompt

        # the two pools interleaved, so that any run of consecutive answers (a gate's window) asks both alike
        pools = [load_dataset(ds, world_dir=world_dir) for ds in ("demo_world:kb_only:heldout",
                                                                  "demo_world:taught:heldout")]
        rows = [r for pair in itertools.zip_longest(*pools) for r in pair if r is not None]
        traffic = LiveTraffic(procs["generation"].target, procs["answer"].target, DEMO_MODEL,
                              [render_prompt(r.question, "demo") for r in rows]).start()
        console.print(f"simulated users now ask {DEMO_MODEL} held-out questions ({len(rows)} in rotation); the "
                      "generation service samples their answers to the answer service, which verifies them live")
    console.rule("12. GRPO through the services: rollouts <- generation (+retrieval), rewards <- reward, "
                 "weights -> generation every step")
    after_version = asyncio.run(train_through_service(console, procs["training"].target, run_id, start,
                                                      generation_model=DEMO_MODEL))
    if traffic is not None:
        console.print(traffic.table())
    console.rule("13. evaluate again")
    after = evaluate_both("after")
    table = Table(title="held-out demo-world questions: before vs after GRPO")
    for col in ("questions", "", "correct", "hallucinated", "of which cut off", "abstained", "correct-or-abstain",
                "searched"):
        table.add_column(col, justify="left" if col in ("questions", "") else "right")
    for b, a in zip(before, after):
        name = b["benchmark"].split(":")[1]
        for tag, r in ((f"before v{b['weight_version']}", b), (f"after v{a['weight_version']}", a)):
            table.add_row(name, tag, f"{r['correct']:.0%}", f"{r['incorrect']:.0%}", f"{r['incorrect_cut_off']:.0%}",
                          f"{r['not_attempted']:.0%}",
                          f"{r['correct_or_abstain']:.0%}", f"{r['search_rate']:.0%}")
    console.print(table)
    b, a = before[0], after[0]
    drop = 1 - a["incorrect"] / b["incorrect"] if b["incorrect"] else 0.0
    console.print(f"facts only the knowledge base holds: hallucinated answers {b['incorrect']:.0%} -> "
                  f"{a['incorrect']:.0%} ({drop:.0%} relative drop); correct-or-abstain "
                  f"{b['correct_or_abstain']:.0%} -> {a['correct_or_abstain']:.0%}; generation now serves "
                  f"{DEMO_MODEL} v{after_version}")
    console.print(f"results: {Path(a['path']).parent} (JSON per benchmark and version), chart: {a['chart']}")
    console.print(f"training metrics and eval gauges: http://127.0.0.1:{procs['training'].metrics_port}/metrics "
                  f"(knowserve_training_*, knowserve_eval_*)")
    if traffic is not None:
        from services.demo_live import gated_swap

        console.rule("14. a hallucination-gated swap: the pre-GRPO weights as a candidate, judged on live traffic")
        try:
            # one full rotation of the users' questions per version: both versions are judged on the same questions
            asyncio.run(gated_swap(console, procs["generation"].target, procs["answer"].target, DEMO_MODEL,
                                   str(start), min_answers=len(traffic.prompts), window_seconds=240))
        finally:
            traffic.stop()
        console.print(f"simulated users: {traffic.requests} requests, {traffic.failures} failed; live rate by "
                      f"model and version: knowserve:live_unsupported_answers:ratio_rate10m in Prometheus")


def publish_start(procs: dict, model_dir: Path, run_id: str, model: str = "") -> tuple[Path, int, float]:
    """Copy ``model_dir`` into the checkpoint root as the run's starting policy and hot-swap it into the served
    ``model`` ("" = the default) as its next weight version: (its folder, version, swap seconds)."""
    import shutil

    from services.generation.client import GenerationClient

    start = stack.run_dir() / "checkpoints" / run_id / "start"
    shutil.copytree(model_dir, start, dirs_exist_ok=True)

    async def publish():
        async with GenerationClient(procs["generation"].target, model=model) as g:
            info = await g.model_info()
            return await g.update_weights(str(start), max(info.weight_version, info.latest_version) + 1)

    reply = asyncio.run(publish())
    return start, reply.version, reply.swap_seconds


async def train_through_service(console: Console, target: str, run_id: str, model: Path, cfg=None,
                                log_every: int = 10, generation_model: str = "") -> int:
    """StartRun on the training service with ``cfg`` (a RunConfig; default training/configs/demo_world.yaml), then
    follow its progress with a bar, a line every ``log_every`` steps; returns the weight version it left serving."""
    from services.common.progress import progress as tqdm

    from knowserve.training.v1 import training_service_pb2 as tpb
    from services.training.client import TrainingClient
    from training.config import RunConfig

    cfg = cfg or RunConfig.from_yaml(Path(__file__).resolve().parents[1] / "training/configs/demo_world.yaml")
    cfg = cfg.model_copy(update={"generation_model": generation_model})
    async with TrainingClient(target) as client:
        run = await client.start_run_config(cfg, model=str(model), run_id=run_id)
        console.print(f"run {run.run_id}: {run.recipe} on {run.dataset}, {run.hyperparameters.max_steps} steps of "
                      f"{run.hyperparameters.batch_size} rollouts (groups of {run.hyperparameters.group_size})")
        bar = tqdm(total=run.hyperparameters.max_steps, desc="GRPO", unit="step")
        async for p in client.stream_progress(run.run_id):
            bar.update(p.step - bar.n)
            bar.set_postfix(reward=f"{p.reward_mean:+.2f}", v=p.weight_version)
            if p.step == 1 or p.step % log_every == 0:
                comps = ", ".join(f"{k} {v:+.2f}" for k, v in sorted(p.reward_components.items()))
                bar.write(f"  step {p.step}: reward {p.reward_mean:+.2f} ({comps}), refusal {p.refusal_rate:.0%}, "
                          f"{p.step_seconds:.0f}s; {p.message}")
        bar.close()
        run = await client.get_run(run.run_id)
        if run.state != tpb.RUN_STATE_SUCCEEDED:
            raise SystemExit(f"GRPO run {run.run_id} ended {tpb.RunState.Name(run.state)}: {run.error}")
        console.print(f"run {run.run_id}: {run.step} steps, generation serves v{run.weight_version}")
        return run.weight_version


def run_demo_full(config: str = "", fresh: bool = True) -> int:
    """``make demo-full``: the SmolLM2 pipeline (``training/configs/smollm2_pipeline.yaml``: KnowRL's cold start built
    from the served model's own right and wrong answers -> SFT -> KnowRL GRPO) on the stack's ``smollm2-policy``
    model, evaluated on held-out questions before and after every stage: a per-stage table and a chart."""
    from training.errors import ConfigError
    from training.pipeline import Pipeline, PipelineConfig, PipelineFailed, print_summary

    console = make_console()
    console.rule("1. the stack")
    procs = stack.up()
    path = Path(config) if config else Path(__file__).resolve().parents[1] / "training/configs/smollm2_pipeline.yaml"
    cfg = PipelineConfig.from_yaml(path)
    updates = {"runs_dir": str(stack.run_dir() / "runs"), "checkpoint_root": str(stack.run_dir() / "checkpoints"),
               "generation_target": procs["generation"].target, "training_target": procs["training"].target,
               "verification_target": procs["verification"].target, "retrieval_target": procs["retrieval"].target}
    if fresh:
        updates["name"] = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = cfg.model_copy(update=updates)
    console.rule(f"2. pipeline {cfg.name}: " + " -> ".join(s.name for s in cfg.stages) + f" on {cfg.generation_model}")
    console.print(f"held-out evaluation: {cfg.data.eval_size} questions from {cfg.data.sources} never seen by any "
                  f"stage; training questions: {cfg.data.train_size}")
    try:
        state = asyncio.run(Pipeline(cfg, log=lambda m: console.print(m, markup=False, highlight=False)).run())
    except (ConfigError, PipelineFailed) as e:
        console.print(f"[red]{e}[/red]")
        return 1
    console.rule("3. before and after every stage")
    print_summary(state, console)
    console.print(f"{cfg.generation_model} now serves the pipeline's weights; `knowserve models` lists its kept "
                  f"versions and `knowserve rollback {cfg.generation_model} <version>` returns to one")
    return 0
