"""The ``knowserve`` command: local stack, corpus ingestion, knowledge edits, search, demo.

    knowserve up | status | down
    knowserve ingest CORPUS.jsonl|.parquet [--target 127.0.0.1:50051 | --data-dir DIR]
    knowserve edit add --id ID --title T --text "corrected fact"    |    knowserve edit rm ID [ID ...]
    knowserve search "who wrote Hamlet" [--top-k 3] [--mode bm25|dense|hybrid]
    knowserve verify "Marie Curie was born in Warsaw in 1867." [--judge lexical|nli] [--section think]
    knowserve score --recipe knowrl --completion "<think>…</think><answer>Paris</answer>" --gold Paris
    knowserve train-verifier [--out DIR] [--budget-seconds 900] [--layers 3]
    knowserve demo
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from services.common.clients import DEFAULT_PORTS


def _retrieval_target(args) -> str:
    return args.target or f"127.0.0.1:{DEFAULT_PORTS['retrieval']}"


def cmd_up(args) -> int:
    from services import stack

    stack.up(args.services, timeout=args.timeout)
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
        async with VerificationClient(args.target or f"127.0.0.1:{DEFAULT_PORTS['verification']}") as client:
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
        async with RewardClient(args.target or f"127.0.0.1:{DEFAULT_PORTS['reward']}") as client:
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
        learning_rate=args.learning_rate, max_length=args.max_length, device=args.device, seed=args.seed)
    r = train_verifier(cfg)
    print(f"saved {r.out_dir}: {r.steps} steps in {r.seconds:.0f}s ({r.stopped_by}); training pairs {r.train_examples}")
    print(f"held-out VitaminC ({r.heldout_examples}): accuracy {r.heldout_accuracy:.3f} vs majority-class "
          f"({r.majority_label}) {r.majority_accuracy:.3f}; per label " +
          ", ".join(f"{k} {v:.2f}" for k, v in r.per_label_accuracy.items()))
    return 0


def cmd_demo(args) -> int:
    from services.demo import run_demo

    return run_demo()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knowserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="start the local stack and wait until every service is SERVING")
    p.add_argument("--services", help="comma-separated subset (default: all; env KNOWSERVE_STACK_SERVICES)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for SERVING")
    p.set_defaults(fn=cmd_up)
    sub.add_parser("status", help="show the local stack's services and health").set_defaults(fn=cmd_status)
    sub.add_parser("down", help="stop the local stack's own processes").set_defaults(fn=cmd_down)

    p = sub.add_parser("ingest", help="stream a corpus (.jsonl/.parquet: id, title, text, source) into the index")
    p.add_argument("corpus")
    p.add_argument("--target", help="retrieval service host:port (default 127.0.0.1:50051)")
    p.add_argument("--data-dir", help="write an embedded index folder directly instead of through the service")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--source", default="", help="source for rows that have none")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the service")
    p.set_defaults(fn=cmd_ingest)

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
    p.add_argument("--judge", default="", help="lexical or nli (default: the service's)")
    p.add_argument("--topic", default="", help="prepended to each claim's evidence query")
    p.add_argument("--section", choices=["all", "think", "answer"], default="all")
    p.add_argument("--target", help="verification host:port (default 127.0.0.1:50052)")
    p.set_defaults(fn=cmd_verify)

    p = sub.add_parser("score", help="score one completion under a reward recipe")
    p.add_argument("--recipe", required=True)
    p.add_argument("--completion", required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--gold", action="append", default=[], help="a gold answer (repeat for aliases)")
    p.add_argument("--target", help="reward host:port (default 127.0.0.1:50053)")
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
    p.add_argument("--device", default="auto", help="auto uses a GPU when there is one")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_train_verifier)

    sub.add_parser("demo", help="start the stack, ingest the demo corpus, show it working").set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
