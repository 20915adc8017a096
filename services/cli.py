"""The ``knowserve`` command: local stack, corpus ingestion, knowledge edits, search, demo.

    knowserve up | status | down
    knowserve ingest CORPUS.jsonl|.parquet [--target 127.0.0.1:50051 | --data-dir DIR]
    knowserve edit add --id ID --title T --text "corrected fact"    |    knowserve edit rm ID [ID ...]
    knowserve search "who wrote Hamlet" [--top-k 3] [--mode bm25|dense|hybrid]
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

    sub.add_parser("demo", help="start the stack, ingest the demo corpus, show it working").set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
