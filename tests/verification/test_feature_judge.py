"""The feature judge (gradient-boosted trees over alignment features): trained by the real `train-judge` recipe,
served as the default judge over real gRPC, with calibrated scores; a missing or broken model folder."""

from __future__ import annotations

import json
import shutil

import pytest

from knowserve.verification.v1 import verification_service_pb2 as pb
from services.retrieval.core import Passage
from services.verification.config import VerificationSettings
from services.verification.core import VerifyItem
from services.verification.learned import META_FILE, FeatureJudge, FeatureModel
from services.verification.server import VerificationApp
from tests.conftest import free_port
from tests.verification.conftest import KB, REFUTED_CLAIMS, SUPPORTED_CLAIMS, UNVERIFIABLE_CLAIMS

pytestmark = pytest.mark.timeout(600)
LABEL = pb.Label.Name


def passage(title: str, text: str) -> Passage:
    return Passage(id=title.lower().replace(" ", "-"), document_id=title, title=title, text=text, source="wiki",
                   score=1.0)


THAMES = passage("River Thames", "River Thames: length 346 km; it flows through Oxford and London to the North Sea.")
BAIKAL = passage("Lake Baikal", "Lake Baikal: maximum depth 1,642 m; it is the deepest lake in the world, and it "
                 "holds 23,615 cubic kilometres of water.")
# the worked examples and a negation, each (claim, evidence, label)
WORKED = [
    ("The River Thames is 346 kilometres long.", THAMES, "SUPPORTED"),
    ("The River Thames is 410 kilometres long.", THAMES, "REFUTED"),
    ("The River Thames is more than 300 km long.", THAMES, "SUPPORTED"),
    ("The River Thames does not flow through London.", THAMES, "REFUTED"),
    ("The River Thames is home to a rare blue frog.", THAMES, "NOT_ENOUGH_INFO"),
    ("Lake Baikal is 1,642 metres deep.", BAIKAL, "SUPPORTED"),
    ("Lake Baikal holds 23,615 km3 of water.", BAIKAL, "SUPPORTED"),
    ("Lake Baikal is about 1,600 m deep.", BAIKAL, "SUPPORTED"),
]


def test_training_report_beats_the_lexical_judge_and_is_calibrated(feature_judge_dir):
    meta = json.loads((feature_judge_dir / META_FILE).read_text())
    report = meta["report"]
    # held-out groups (articles, HaluEval questions) the trees never saw
    assert report["calibration_accuracy"] > report["lexical_accuracy"] + 0.05, report
    assert report["calibration_accuracy"] > report["calibration_majority"] + 0.3, report
    assert report["ece_after"] < 0.05, report
    assert set(report["examples"]) >= {"contrastive", "edits", "halueval"}


def test_worked_examples_and_probabilities(feature_judge_dir):
    judge = FeatureJudge(FeatureModel(feature_judge_dir))
    verdicts = judge.judge([c for c, _, _ in WORKED], [[p] for _, p, _ in WORKED])
    assert [v.label for v in verdicts] == [lab for _, _, lab in WORKED], [
        (c, v.label, v.score) for (c, _, _), v in zip(WORKED, verdicts)]
    assert all(0.5 <= v.score <= 1.0 for v in verdicts)  # the chosen label's calibrated probability
    x, _ = judge.rows([c for c, _, _ in WORKED], [[p] for _, p, _ in WORKED])
    probs = judge.model.predict(x)
    assert probs.shape == (len(WORKED), 3) and abs(probs.sum(axis=1) - 1).max() < 1e-9


def test_text_the_normaliser_cannot_read_falls_back_without_error(feature_judge_dir):
    judge = FeatureJudge(FeatureModel(feature_judge_dir))
    odd = passage("Байкал", "Озеро Байкал — самое глубокое озеро на планете, глубина 1642 м. 貝加爾湖 ١٦٤٢")
    claims = ["Байкал глубиной 1642 м.", "貝加爾湖很深。", "", "12 ÷ 0 = ∞ km/h²", "\u202e\u0000 9999999999999 mol"]
    verdicts = judge.judge(claims, [[odd]] * len(claims))
    assert len(verdicts) == len(claims)
    assert all(v.label in ("SUPPORTED", "REFUTED", "NOT_ENOUGH_INFO") and 0 <= v.score <= 1 for v in verdicts)


async def test_served_as_the_default_judge_with_retrieved_evidence(start_retrieval, start_verification,
                                                                   feature_judge_dir):
    retrieval = await start_retrieval()
    await retrieval.client.upsert(KB)
    v = await start_verification(retrieval_target=retrieval.server.address, default_judge="feature",
                                 judge_model_path=feature_judge_dir)
    listed = await v.client.list_judges()
    assert listed.default_judge == "feature"
    assert {j.name: j.ready for j in listed.judges}["feature"] is True
    claims = SUPPORTED_CLAIMS + REFUTED_CLAIMS + UNVERIFIABLE_CLAIMS
    want = ["SUPPORTED"] * len(SUPPORTED_CLAIMS) + ["REFUTED"] * len(REFUTED_CLAIMS) + \
        ["NOT_ENOUGH_INFO"] * len(UNVERIFIABLE_CLAIMS)
    reply = await v.client.verify([VerifyItem(claims=claims)])  # no judge named: the default
    assert reply.judge == "feature"
    got = [LABEL(c.label).removeprefix("LABEL_") for c in reply.results[0].claims]
    right = sum(g == w for g, w in zip(got, want))
    # evidence comes from retrieval here (top 3 of the three-article fixture), not handed over
    assert right >= 9, list(zip(claims, got))
    assert all(0.0 <= c.score <= 1.0 for c in reply.results[0].claims)
    # gold evidence handed over with the item
    worked = await v.client.verify([VerifyItem(claims=[c], evidence=[p]) for c, p, _ in WORKED])
    assert [LABEL(r.claims[0].label).removeprefix("LABEL_") for r in worked.results] == [w for _, _, w in WORKED]


async def test_missing_folder_is_not_ready_and_broken_folder_stops_the_start(tmp_path, start_verification,
                                                                            feature_judge_dir):
    v = await start_verification(retrieval_target=f"127.0.0.1:{free_port()}", judge_model_path=tmp_path / "none")
    listed = {j.name: j for j in (await v.client.list_judges()).judges}
    assert listed["feature"].ready is False and "knowserve train-judge" in listed["feature"].description
    with pytest.raises(Exception, match="not available"):
        await v.client.verify([VerifyItem(claims=["Marie Curie was born in 1867."], evidence=[THAMES])],
                              judge="feature")

    broken = tmp_path / "broken"
    shutil.copytree(feature_judge_dir, broken)
    (broken / "model.skops").write_bytes(b"PK\x03\x04 not a model")
    settings = VerificationSettings(port=0, metrics_port=0, retrieval_target=f"127.0.0.1:{free_port()}",
                                    generation_target="", default_judge="feature", judge_model_path=broken,
                                    nli_model_path=tmp_path / "no-nli")
    app = VerificationApp(settings)
    with pytest.raises(RuntimeError) as err:
        await app.startup()
    assert str(broken) in str(err.value) and "knowserve train-judge" in str(err.value)
    # as a judge that is not the default, the same folder is listed as not ready instead
    v2 = await start_verification(retrieval_target=f"127.0.0.1:{free_port()}", judge_model_path=broken)
    listed = {j.name: j for j in (await v2.client.list_judges()).judges}
    assert listed["feature"].ready is False and "cannot be loaded" in listed["feature"].description
