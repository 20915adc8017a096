"""The ``knowserve`` command: local stack, corpus ingestion, knowledge edits, search, demo.

    knowserve up | status | down
    knowserve ingest CORPUS.jsonl|.parquet [--target 127.0.0.1:50051 | --data-dir DIR]
    knowserve edit add --id ID --title T --text "corrected fact"    |    knowserve edit rm ID [ID ...]
    knowserve search "who wrote Hamlet" [--top-k 3] [--mode bm25|dense|hybrid]
    knowserve verify "Marie Curie was born in Warsaw in 1867." [--judge feature|lexical|nli] [--section think]
    knowserve score --recipe knowrl --completion "<think>…</think><answer>Paris</answer>" --gold Paris
    knowserve train-verifier [--out DIR] [--budget-seconds 900] [--layers 3]
    knowserve train-judge [--out .knowserve/models/judge]           (the feature judge, the default; ~30-60 s)
    knowserve world build [--out .knowserve/world] [--model]      (the demo world and its own small model)
    knowserve train CONFIG.yaml [--resume] [--via-service]          (GRPO through the services, progress bar)
    knowserve runs [RUN_ID]                                         (the training service's runs)
    knowserve eval --dataset demo_world:kb_only:heldout [--mode closed_book|retrieval] [--limit N] [--model M]
    knowserve data rtuning|coldstart|knowtuning --dataset qa_wikidata --out data.jsonl   (training data builders)
    knowserve pipeline CONFIG.yaml [--resume]                       (build and train stages, evaluated after each)
    knowserve models                                                (served models, versions, kept versions)
    knowserve rollback MODEL VERSION                                (swap a model back to a kept version)
    knowserve ask "Who wrote Hamlet?" [--model M] [--stream] [--search-tool]   (grounded answer with citations)
    knowserve demo
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from services.common.addresses import GENERATION_APP, default_target
from services.common.grading import ANSWER_FROM, MATCHES
from services.common.tools import DEFAULT as DEFAULT_TOOL_PROTOCOL
from services.common.tools import NAMES as TOOL_NAMES


def _retrieval_target(args) -> str:
    return args.target or default_target("retrieval")


def cmd_up(args) -> int:
    from services import stack

    stack.up(args.services, timeout=args.timeout, auth=args.auth, tls=args.tls)
    if args.auth or args.tls:
        env = stack.client_security_env()
        print("secured: " + ", ".join(f"{k}={v}" for k, v in env.items())
              + "\n(this CLI uses them by itself; other clients: export them, or pass the token as "
              "'authorization: Bearer <token>' metadata / the OpenAI client's api_key)")
    return 0


def cmd_status(args) -> int:
    from services import stack

    return stack.status()


def cmd_down(args) -> int:
    from services import stack

    return stack.down()


def cmd_ingest(args) -> int:
    from services.retrieval.ingest import ingest

    path = Path(args.corpus)
    if not path.exists():
        print(f"{path}: no such file", file=sys.stderr)
        return 2
    if args.data_dir:  # write the index directly (the service must not be running on that folder)
        from services.retrieval.config import RetrievalSettings
        from services.retrieval.core import RetrievalCore
        from services.retrieval.server import build_backend

        settings = RetrievalSettings(data_dir=Path(args.data_dir))
        core = RetrievalCore(settings, build_backend(settings))
        report = ingest(path, core.upsert, batch_size=args.batch_size, source=args.source)
        core.backend.close()
    else:
        from services.retrieval.client import RetrievalClient
        from services.retrieval.ingest import ingest_through_service

        async def run():
            async with RetrievalClient(_retrieval_target(args)) as client:
                await client.wait_healthy(timeout=args.wait)
                return await ingest_through_service(path, client, batch_size=args.batch_size, source=args.source)

        report = asyncio.run(run())
    print(f"ingested {report.documents} documents ({report.passages} passages, {report.replaced} replaced), "
          f"skipped {report.skipped}")
    for example in report.skipped_examples:
        print(f"  skipped {example}")
    return 0


def cmd_reembed(args) -> int:
    from services.retrieval.config import RetrievalSettings
    from services.retrieval.embedded import reembed
    from services.retrieval.encoder import load_encoder

    settings = RetrievalSettings(**({"data_dir": Path(args.data_dir)} if args.data_dir else {}))
    if not (Path(settings.data_dir) / "tantivy").exists():
        print(f"{settings.data_dir}: no embedded index here (set --data-dir)", file=sys.stderr)
        return 2
    started = time.monotonic()
    n = reembed(settings, load_encoder(settings))
    took = time.monotonic() - started
    print(f"re-embedded {n} passages in {took:.1f} s ({n / max(took, 1e-9):.0f} passages/s) into "
          f"{settings.data_dir}/dense with {settings.encoder_runtime} encoder")
    return 0


def cmd_edit(args) -> int:
    from services.retrieval.client import RetrievalClient
    from services.retrieval.core import Document

    async def run() -> int:
        async with RetrievalClient(_retrieval_target(args)) as client:
            if args.action == "add":
                r = await client.upsert([Document(args.id, args.title, args.text, args.source)])
                print(f"{'replaced' if r.documents_replaced else 'added'} {args.id} ({r.passages_written} passages)")
            else:
                r = await client.delete(args.ids)
                print(f"deleted {r.documents_deleted}" + (f"; not found: {r.not_found_ids}" if r.not_found_ids else ""))
            return 0

    return asyncio.run(run())


def cmd_search(args) -> int:
    from services.retrieval.client import RetrievalClient

    async def run():
        async with RetrievalClient(_retrieval_target(args)) as client:
            return (await client.search([args.query], top_k=args.top_k, mode=args.mode))[0]

    for rank, p in enumerate(asyncio.run(run()), start=1):
        print(f"{rank:2d}. [{p.score:.3f} {p.backend}{' edit' if p.source == 'edit' else ''}] {p.title}: {p.text[:160]}")
    return 0


def cmd_verify(args) -> int:
    from knowserve.verification.v1 import verification_service_pb2 as vpb
    from services.verification.client import VerificationClient
    from services.verification.core import VerifyItem

    async def run():
        async with VerificationClient(args.target or default_target("verification")) as client:
            return await client.verify([VerifyItem(answer=args.answer, topic=args.topic, section=args.section)],
                                       judge=args.judge)

    reply = asyncio.run(run())
    r = reply.results[0]
    print(f"{vpb.AnswerKind.Name(r.kind).removeprefix('ANSWER_KIND_').lower()}: FActScore {r.factscore:.2f} "
          f"(length-penalized {r.length_penalized_score:.2f}), judge {reply.judge}")
    for c in r.claims:
        label = vpb.Label.Name(c.label).removeprefix("LABEL_")
        print(f"  {label:16s} {c.score:.2f}  {c.text}  {list(c.evidence_ids)}")
    return 0


def cmd_score(args) -> int:
    from services.reward.client import RewardClient
    from services.reward.core import ScoreItem

    async def run():
        async with RewardClient(args.target or default_target("reward")) as client:
            return await client.score(args.recipe, [ScoreItem(args.prompt, args.completion, args.gold)])

    reply = asyncio.run(run())
    s = reply.scores[0]
    print(f"{reply.recipe} {reply.recipe_version}: total {s.total:+.3f}")
    for c in s.components:
        value = f"{c.value:+.3f}" if c.applicable else "  n/a "
        print(f"  {c.name:26s} {value}  x{c.weight:g}  {c.detail}")
    return 0


def cmd_train_verifier(args) -> int:
    from services.retrieval.demo_corpus import build_wiki_corpus
    from services.verification.nli import TrainVerifierConfig, train_verifier

    corpus = Path(args.corpus) if args.corpus else Path(".knowserve/data/wiki.jsonl")
    if args.synthetic_examples and not corpus.exists():
        build_wiki_corpus(corpus)
    cfg = TrainVerifierConfig(
        out_dir=Path(args.out), layers=args.layers, vitaminc_examples=args.vitaminc_examples,
        fever_examples=args.fever_examples, synthetic_examples=args.synthetic_examples,
        corpus_jsonl=corpus if args.synthetic_examples else None, heldout_examples=args.heldout,
        epochs=args.epochs, time_budget_seconds=args.budget_seconds, batch_size=args.batch_size,
        learning_rate=args.learning_rate, max_length=args.max_length, device=args.device, seed=args.seed,
        freeze_embeddings=args.freeze_embeddings)
    r = train_verifier(cfg)
    print(f"saved {r.out_dir}: {r.steps} steps in {r.seconds:.0f}s ({r.stopped_by}); training pairs {r.train_examples}")
    print(f"held-out VitaminC ({r.heldout_examples}): accuracy {r.heldout_accuracy:.3f} vs majority-class "
          f"({r.majority_label}) {r.majority_accuracy:.3f}; per label " +
          ", ".join(f"{k} {v:.2f}" for k, v in r.per_label_accuracy.items()))
    return 0


def cmd_train_judge(args) -> int:
    import logging

    from services.verification.learned import TrainJudgeConfig, train_judge

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    cfg = TrainJudgeConfig(out_dir=Path(args.out), edits=args.edits, halueval=not args.no_halueval,
                           max_iter=args.max_iter, seed=args.seed,
                           **({"corpus_jsonl": Path(args.corpus)} if args.corpus else {}))
    r = train_judge(cfg)
    print(f"saved {args.out} in {r.seconds:.0f}s; training examples {r.examples}")
    print(f"held-out calibration slice: accuracy {r.calibration_accuracy:.3f} (lexical judge {r.lexical_accuracy:.3f}, "
          f"majority class {r.calibration_majority:.3f}); temperature {r.temperature:.3f}, expected calibration "
          f"error {r.ece_before:.3f} -> {r.ece_after:.3f}")
    return 0


def cmd_demo(args) -> int:
    from services.demo import run_demo, run_demo_full

    if args.full:
        return run_demo_full(args.pipeline)
    return run_demo()


def cmd_world(args) -> int:
    from training.world import build_world

    from training.data import world_dir_default

    out = Path(args.out) if args.out else world_dir_default()
    world = build_world(entities_per_pool=args.entities, seed=args.seed)
    world.save(out)
    print(f"demo world: {len(world.entities)} entities -> {out} (corpus.jsonl, questions_*.jsonl)")
    if args.model:
        from training.demo_model import SftConfig, train_demo_model

        cfg = SftConfig(seed=args.seed, **({"steps": args.sft_steps} if args.sft_steps else {}))
        stats = train_demo_model(world, Path(args.model_out), cfg)
        print(f"demo model: {stats['parameters']:,} parameters, {stats['steps']} cold-start steps, "
              f"loss {stats['final_loss']:.3f}, {stats['seconds']:.0f}s -> {args.model_out}")
    return 0


def cmd_train(args) -> int:
    from services.common.progress import console as make_console

    from training.config import ConfigError, RunConfig

    console = make_console()
    try:
        cfg = RunConfig.from_yaml(Path(args.config))
        if args.run_id:
            cfg = cfg.model_copy(update={"run_id": args.run_id})
        if args.via_service:
            return asyncio.run(_train_via_service(cfg, args, console))
        from training.loop import run_training
        from training.runs import STOPPED, SUCCEEDED, prepare_run

        resume = args.resume and cfg.run_id and (Path(cfg.runs_dir) / cfg.run_id / "state.json").exists()
        run = prepare_run(cfg, resume=bool(resume))
    except (ConfigError, ValueError) as e:
        console.print(f"[red]cannot start the run:[/red] {e}")
        return 2

    def show(r) -> None:  # a training.runs.ProgressRecord
        if r.algorithm == "grpo":
            comps = " ".join(f"{k}={v:+.2f}" for k, v in r.reward_components.items())
            head = (f"reward {r.reward_mean:+.3f} ({comps}) std {r.reward_std:.2f} refusal {r.refusal_rate:.0%} "
                    f"kl {r.kl:.4f} |dlogp| {r.logprob_abs_diff_mean:.4f}")
        else:
            head = f"loss {r.loss:.4f} " + " ".join(f"{k}={v:.3f}" for k, v in sorted(r.metrics.items())
                                                    if k.startswith(("rewards/", "mean_token")))
        console.print(f"step {r.step}/{r.max_steps} {head} v{r.weight_version} {r.step_seconds:.1f}s {r.message}")
        for event in r.events:
            console.print(f"  {event}", markup=False)

    st = run_training(run.root, resume=bool(resume), on_progress=show if args.verbose else None, progress_bar=True)
    console.print(f"run {st.run_id}: {st.state} at step {st.step}/{st.max_steps}, generation serves "
                  f"v{st.weight_version}" + (f" — {st.error}" if st.error else ""))
    return 0 if st.state in (SUCCEEDED, STOPPED) else 1


async def _train_via_service(cfg, args, console) -> int:
    from services.training.client import TrainingClient

    from knowserve.training.v1 import training_service_pb2 as pb

    async with TrainingClient(args.target or default_target("training")) as client:
        run = await client.start_run_config(cfg, model=str(Path(cfg.model).resolve()), resume=args.resume)
        console.print(f"run {run.run_id} started")
        async for p in client.stream_progress(run.run_id):
            console.print(f"step {p.step}/{p.max_steps} reward {p.reward_mean:+.3f} refusal {p.refusal_rate:.0%} "
                          f"v{p.weight_version} {p.message}", markup=False)
            for event in p.events:
                console.print(f"  {event}", markup=False)
        run = await client.get_run(run.run_id)
        console.print(f"run {run.run_id}: {pb.RunState.Name(run.state)} at step {run.step}")
        return 0 if run.state in (pb.RUN_STATE_SUCCEEDED, pb.RUN_STATE_STOPPED) else 1


def cmd_runs(args) -> int:
    from services.common.progress import console as make_console
    from rich.table import Table

    from knowserve.training.v1 import training_service_pb2 as pb
    from services.training.client import TrainingClient

    async def run() -> list:
        async with TrainingClient(args.target or default_target("training")) as client:
            if args.run_id:
                return [await client.get_run(args.run_id)]
            return await client.list_runs()

    t = Table(title="training runs")
    for col in ("run", "state", "recipe", "dataset", "step", "version", "error"):
        t.add_column(col)
    for r in asyncio.run(run()):
        t.add_row(r.run_id, pb.RunState.Name(r.state).removeprefix("RUN_STATE_"), r.recipe, r.dataset,
                  f"{r.step}/{r.hyperparameters.max_steps}", f"v{r.weight_version}", r.error[:80])
    make_console().print(t)
    return 0


def cmd_data(args) -> int:
    from training.builders import BuildConfig, build
    from training.data import DatasetError

    fields = {k: v for k, v in vars(args).items() if k in BuildConfig.__dataclass_fields__ and v is not None}
    try:
        summary = asyncio.run(build(BuildConfig(builder=args.builder, **fields)))
    except DatasetError as e:
        print(f"cannot build: {e}", file=sys.stderr)
        return 2
    print(f"{summary.builder}: {summary.rows} rows -> {summary.out} in {summary.seconds:.0f}s; {summary.counts}")
    print(f"summary: {Path(summary.out).with_suffix('.summary.json')}")
    return 0


def cmd_pipeline(args) -> int:
    from services.common.progress import console as make_console
    from training.errors import ConfigError
    from training.pipeline import PipelineFailed, print_summary, run_pipeline

    console = make_console()
    try:
        state = run_pipeline(Path(args.config), resume=args.resume,
                             log=lambda m: console.print(m, markup=False, highlight=False))
    except (ConfigError, PipelineFailed) as e:
        console.print(f"[red]{e}[/red]")
        return 1
    print_summary(state, console, Path(args.chart) if args.chart else None)
    return 0


def _generation_client(args):
    from services.generation.client import GenerationClient

    return GenerationClient(args.target or default_target("generation"), app_name=args.generation_app)


def cmd_models(args) -> int:
    from rich.table import Table

    from services.common.progress import console as make_console

    async def run():
        async with _generation_client(args) as g:
            return await g.list_models()

    t = Table(title="served models")
    from knowserve.generation.v1 import generation_service_pb2 as gpb

    for col in ("model", "engine", "parameters", "serving", "checkpoint", "kept versions", "replicas", "last gate"):
        t.add_column(col, overflow="fold")
    for m in asyncio.run(run()):
        kept = ", ".join(f"v{k.version}" for k in m.kept_versions)
        gate = (f"{gpb.GateState.Name(m.gate.state).removeprefix('GATE_STATE_').lower()}: {m.gate.message}"
                if m.HasField("gate") else "-")
        t.add_row(m.model + (" (default)" if m.is_default else ""), m.engine, f"{m.parameters / 1e6:.1f}M",
                  f"v{m.weight_version}" + (f" (latest v{m.latest_version})" if m.latest_version > m.weight_version
                                            else ""), f"{m.model_name}: {m.checkpoint_uri}", kept, str(m.replicas),
                  gate)
    make_console().print(t)
    return 0


def cmd_rollback(args) -> int:
    async def run():
        async with _generation_client(args) as g:
            return await g.rollback_weights(args.version, model=args.model)

    r = asyncio.run(run())
    print(f"{args.model}: v{r.previous_version} -> v{r.version} on {r.replicas_updated} replica(s) in "
          f"{r.swap_seconds:.2f}s")
    return 0


def print_answer(r, printer=print) -> None:
    """An AnswerResponse as a person reads it: answer, outcome, claims with verdicts, citations."""
    from services.answer.client import outcome_name, verdict_name

    printer(r.answer)
    verified = "" if r.verified else " (verification unavailable: unverified)"
    printer(f"[{outcome_name(r.outcome)}] support {r.support:.0%} of {len(r.claims)} claim(s); {r.model} "
            f"v{r.weight_version}{verified}; " + ", ".join(f"{k} {v:.2f}s" for k, v in sorted(r.timings.items())))
    if r.generated != r.answer:
        printer(f"  the model said: {r.generated.strip()}")
    for c in r.claims:
        printer(f"  {verdict_name(c.verdict):16s} {c.score:.2f}  {c.text}  {list(c.passage_ids)}")
    for c in r.citations:
        printer(f"  [{c.passage_id}] {c.title} (claims {', '.join(str(i + 1) for i in c.claim_indexes)})")


def cmd_ask(args) -> int:
    from services.answer.client import AnswerClient

    async def run():
        async with AnswerClient(args.target or default_target("answer")) as client:
            kw = dict(top_k=args.top_k, support_threshold=args.threshold, model=args.model,
                      max_tokens=args.max_tokens)
            if not args.stream:
                return await client.answer(args.question, mode="search_tool" if args.search_tool else "passages",
                                           **kw)
            result = None
            async for chunk in client.answer_stream(args.question, **kw):
                if chunk.HasField("result"):
                    result = chunk.result
                else:
                    print(chunk.text_delta, end="", flush=True)
            print()
            return result

    print_answer(asyncio.run(run()))
    return 0


def cmd_eval(args) -> int:
    from services.common.progress import console as make_console

    from training.eval import EvalConfig, evaluate, summary_table

    cfg = EvalConfig(dataset=args.dataset, limit=args.limit, seed=args.seed, mode=args.mode,
                     tool_protocol=args.tool_protocol, prompt_format=args.prompt_format, match=args.match,
                     answer_from=args.answer_from,
                     max_tokens=args.max_tokens, generation_target=args.generation,
                     generation_app_name=args.generation_app, model=args.model,
                     verification_target=args.verification, out_dir=args.out, label=args.label)
    result = asyncio.run(evaluate(cfg))
    console = make_console()
    console.print(summary_table([result]))
    console.print(f"results: {result['path']}  chart: {result['chart']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knowserve", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--token-file", help="file with the bearer token to send (env KNOWSERVE_TOKEN_FILE; default: "
                        "the local stack's when it runs with --auth)")
    parser.add_argument("--tls-ca", help="CA that signed the services' certificates; enables TLS (env "
                        "KNOWSERVE_TLS_CA_FILE; default: the local stack's when it runs with --tls)")
    parser.add_argument("--tls-cert", help="client certificate for mTLS (env KNOWSERVE_TLS_CERT_FILE)")
    parser.add_argument("--tls-key", help="its key (env KNOWSERVE_TLS_KEY_FILE)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="start the local stack and wait until every service is SERVING")
    p.add_argument("--services", help="comma-separated subset (default: all; env KNOWSERVE_STACK_SERVICES)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for SERVING")
    p.add_argument("--auth", action="store_true", help="every service requires a generated bearer token "
                   "(.knowserve/security/token); services send it to each other, this CLI uses it")
    p.add_argument("--tls", action="store_true", help="mTLS between every service and its clients, with a "
                   "generated CA and certificate (generation stays plaintext: Ray Serve's gRPC proxy has no TLS)")
    p.set_defaults(fn=cmd_up)
    sub.add_parser("status", help="show the local stack's services and health").set_defaults(fn=cmd_status)
    sub.add_parser("down", help="stop the local stack's own processes").set_defaults(fn=cmd_down)

    p = sub.add_parser("ingest", help="stream a corpus (.jsonl/.parquet: id, title, text, source) into the index")
    p.add_argument("corpus")
    p.add_argument("--target", help=f"retrieval service host:port (default {default_target('retrieval')})")
    p.add_argument("--data-dir", help="write an embedded index folder directly instead of through the service")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--source", default="", help="source for rows that have none")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the service")
    p.set_defaults(fn=cmd_ingest)

    p = sub.add_parser("reembed", help="re-embed the embedded index's passages with the configured encoder "
                       "(after changing it; retrieval service stopped)")
    p.add_argument("--data-dir", help="embedded index folder (default KNOWSERVE_RETRIEVAL_DATA_DIR)")
    p.set_defaults(fn=cmd_reembed)

    p = sub.add_parser("edit", help="knowledge edits: add (upsert) or rm (delete) documents")
    edit = p.add_subparsers(dest="action", required=True)
    a = edit.add_parser("add", help="upsert a corrected fact (source=edit, boosted over the base corpus)")
    a.add_argument("--id", required=True)
    a.add_argument("--title", default="")
    a.add_argument("--text", required=True)
    a.add_argument("--source", default="edit")
    a.add_argument("--target")
    r = edit.add_parser("rm", help="delete documents by id")
    r.add_argument("ids", nargs="+")
    r.add_argument("--target")
    p.set_defaults(fn=cmd_edit)

    p = sub.add_parser("search", help="search the knowledge corpus")
    p.add_argument("query")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--mode", choices=["", "bm25", "dense", "hybrid"], default="")
    p.add_argument("--target")
    p.set_defaults(fn=cmd_search)

    p = sub.add_parser("verify", help="check an answer's claims against the knowledge base")
    p.add_argument("answer")
    p.add_argument("--judge", default="", help="feature, lexical, nli or llm (default: the service's)")
    p.add_argument("--topic", default="", help="prepended to each claim's evidence query")
    p.add_argument("--section", choices=["all", "think", "answer"], default="all")
    p.add_argument("--target", help=f"verification host:port (default {default_target('verification')})")
    p.set_defaults(fn=cmd_verify)

    p = sub.add_parser("score", help="score one completion under a reward recipe")
    p.add_argument("--recipe", required=True)
    p.add_argument("--completion", required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--gold", action="append", default=[], help="a gold answer (repeat for aliases)")
    p.add_argument("--target", help=f"reward host:port (default {default_target('reward')})")
    p.set_defaults(fn=cmd_score)

    p = sub.add_parser("train-verifier", help="fine-tune the nli judge's cross-encoder (VitaminC + FEVER + edits)")
    p.add_argument("--out", default=".knowserve/models/verifier")
    p.add_argument("--layers", type=int, default=3, help="keep the first N MiniLM layers (0 = all 6; use 0 on a GPU)")
    p.add_argument("--vitaminc-examples", type=int, default=0, help="0 = all (~54k minus the held-out slice)")
    p.add_argument("--fever-examples", type=int, default=2000)
    p.add_argument("--synthetic-examples", type=int, default=30000)
    p.add_argument("--corpus", help="passages for contrastive edits (default: the demo Wikipedia corpus)")
    p.add_argument("--heldout", type=int, default=1000)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--budget-seconds", type=float, default=900.0, help="stop training after this long")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--max-length", type=int, default=56, help="tokens per (evidence window, claim) pair")
    p.add_argument("--freeze-embeddings", action="store_true",
                   help="keep MiniLM's word embeddings fixed (~35%% less CPU time per step)")
    p.add_argument("--device", default="auto", help="auto uses a GPU when there is one")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_train_verifier)

    p = sub.add_parser("train-judge", help="train the feature judge (gradient-boosted trees over alignment features)")
    p.add_argument("--out", default=".knowserve/models/judge")
    p.add_argument("--corpus", help="Wikipedia-style leads JSONL (default: the demo Wikipedia corpus)")
    p.add_argument("--edits", type=int, default=12_000, help="sentence-level edit pairs")
    p.add_argument("--no-halueval", action="store_true", help="leave HaluEval-QA's training third out")
    p.add_argument("--max-iter", type=int, default=300, help="boosting rounds (early stopping picks fewer)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_train_judge)

    p = sub.add_parser("world", help="the demo world: a fictional knowledge base and its own small model")
    w = p.add_subparsers(dest="action", required=True).add_parser("build", help="generate it (and --model)")
    w.add_argument("--out", default="", help="default: $KNOWSERVE_RUN_DIR/world (.knowserve/world)")
    w.add_argument("--entities", type=int, default=40, help="entities per pool (taught, kb_only, copy)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--model", action="store_true", help="also build and cold-start the demo model")
    w.add_argument("--model-out", default=".knowserve/models/demo-world")
    w.add_argument("--sft-steps", type=int, default=0, help="0 = the cold-start default (SftConfig)")
    p.set_defaults(fn=cmd_world)

    p = sub.add_parser("train", help="run GRPO through the services (config YAML: training.config.RunConfig)")
    p.add_argument("config")
    p.add_argument("--run-id", default="")
    p.add_argument("--resume", action="store_true", help="continue the run (config run_id) from its last "
                   "checkpoint if it exists, else start it")
    p.add_argument("--via-service", action="store_true", help="start it on the training service and follow it")
    p.add_argument("--target", help="training service host:port (with --via-service)")
    p.add_argument("--verbose", action="store_true", help="print one line per step")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("runs", help="list the training service's runs (or show one)")
    p.add_argument("run_id", nargs="?")
    p.add_argument("--target")
    p.set_defaults(fn=cmd_runs)

    p = sub.add_parser("eval", help="hallucination evaluation of the served model (JSON + PNG + Prometheus)")
    p.add_argument("--dataset", required=True, help="demo_world[:pool:split], halueval_qa, truthfulqa, "
                   "qa_wikidata, or a .jsonl")
    p.add_argument("--limit", type=int, default=200, help="seeded sample size (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=["closed_book", "retrieval"], default="closed_book")
    p.add_argument("--tool-protocol", choices=TOOL_NAMES, default=DEFAULT_TOOL_PROTOCOL)
    p.add_argument("--prompt-format", choices=["auto", "chat", "demo"], default="auto")
    p.add_argument("--match", choices=MATCHES, default="contains", help="how answers match the gold answers "
                   "(services.common.grading)")
    p.add_argument("--answer-from", choices=ANSWER_FROM, default="answer_tag_or_text",
                   help="where the answer is taken from: the last <answer> tag only, or that else the first line")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--generation", default=default_target("generation"))
    p.add_argument("--generation-app", default=GENERATION_APP, help="Serve application name of the generation "
                   "service (its `application` metadata)")
    p.add_argument("--model", default="", help="served model to evaluate (knowserve models; default: the default)")
    p.add_argument("--verification", default=default_target("verification"),
                   help="verification host:port for claim support ('' skips it)")
    p.add_argument("--out", default="", help="default: $KNOWSERVE_RUN_DIR/eval (.knowserve/eval)")
    p.add_argument("--label", default="")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("data", help="build training data: rtuning, coldstart (KnowRL), knowtuning (DPO pairs)")
    p.add_argument("builder", choices=["rtuning", "coldstart", "knowtuning"])
    p.add_argument("--dataset", help="QA set (rtuning, coldstart) or knowledge corpus (knowtuning: demo_corpus or a "
                   ".jsonl with title, text)")
    p.add_argument("--out", required=True, help="the dataset file to write (.jsonl); a .summary.json goes beside it")
    p.add_argument("--limit", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--exclude", help="a QA .jsonl whose questions are held out (never in the built data)")
    p.add_argument("--samples", type=int, help="answers asked of the served model per question (rtuning, coldstart)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--certain-threshold", dest="certain_threshold", type=float)
    p.add_argument("--method", choices=["refusal", "unsure"], help="rtuning: R-Tuning-R refusals or I am sure/unsure")
    p.add_argument("--recipe", help="coldstart: the training recipe whose format and system prompt (knowrl)")
    p.add_argument("--search", action="store_true", default=None,
                   help="coldstart: R1-Searcher transcripts with retrieved passages")
    p.add_argument("--model", help="the served model asked (knowserve models; default: the default)")
    p.add_argument("--generation", dest="generation_target")
    p.add_argument("--generation-app", dest="generation_app_name")
    p.add_argument("--verification", dest="verification_target")
    p.add_argument("--retrieval", dest="retrieval_target")
    p.set_defaults(fn=cmd_data)

    p = sub.add_parser("pipeline", help="run a training pipeline (build and train stages, evaluated after each)")
    p.add_argument("config")
    p.add_argument("--resume", action="store_true", help="continue from the stage that failed")
    p.add_argument("--chart", default="", help="where the PNG goes (default: the pipeline's folder)")
    p.set_defaults(fn=cmd_pipeline)

    p = sub.add_parser("models", help="the generation service's models: engine, size, serving and kept versions")
    p.add_argument("--target", help=f"generation host:port (default {default_target('generation')})")
    p.add_argument("--generation-app", default=GENERATION_APP)
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("rollback", help="swap a model back (or forward) to one of its kept versions")
    p.add_argument("model")
    p.add_argument("version", type=int)
    p.add_argument("--target", help=f"generation host:port (default {default_target('generation')})")
    p.add_argument("--generation-app", default=GENERATION_APP)
    p.set_defaults(fn=cmd_rollback)

    p = sub.add_parser("ask", help="a grounded answer: retrieved passages -> the served model -> every claim "
                       "verified; answered, flagged, or abstained with a refusal")
    p.add_argument("question")
    p.add_argument("--model", default="", help="served model (default: the answer service's)")
    p.add_argument("--top-k", type=int, default=0, help="passages in the prompt (default: the service's)")
    p.add_argument("--threshold", type=float, default=None, help="support below this abstains (default 0.5)")
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--search-tool", action="store_true", help="the model searches itself (its search protocol)")
    p.add_argument("--stream", action="store_true", help="stream the tokens, then the verdicts (AnswerStream)")
    p.add_argument("--target", help=f"answer host:port (default {default_target('answer')})")
    p.set_defaults(fn=cmd_ask)

    p = sub.add_parser("demo", help="start the stack, ingest the demo corpus, show it working")
    p.add_argument("--full", action="store_true", help="the longer target: the SmolLM2 pipeline (cold start, SFT, "
                   "GRPO) on the stack's smollm2-policy model")
    p.add_argument("--pipeline", default="", help="--full: another pipeline config (default "
                   "training/configs/smollm2_pipeline.yaml)")
    p.set_defaults(fn=cmd_demo)
    return parser


def _client_security(args) -> None:
    """Flags, then the environment, then the secured local stack: what every client of this command sends."""
    import os

    from services import stack
    from services.common import auth

    for flag, env in ((args.token_file, auth.TOKEN_FILE_ENV), (args.tls_ca, auth.TLS_CA_ENV),
                      (args.tls_cert, auth.TLS_CERT_ENV), (args.tls_key, auth.TLS_KEY_ENV)):
        if flag:
            if not Path(flag).is_file():
                raise SystemExit(f"{flag}: no such file")
            os.environ[env] = str(Path(flag).resolve())
    if args.command not in ("up", "down"):
        for key, value in stack.client_security_env().items():
            os.environ.setdefault(key, value)


def main(argv: list[str] | None = None) -> int:
    from services.common.progress import quiet_library_bars

    from services.common.errors import KnowserveError

    args = build_parser().parse_args(argv)
    quiet_library_bars()
    _client_security(args)
    try:
        return int(args.fn(args) or 0)
    except KnowserveError as e:  # a refusal from a service or a domain error: the message, not a traceback
        code = getattr(e, "code", None)
        print(f"error: {e}" + (f" ({code.name})" if code is not None else ""), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
