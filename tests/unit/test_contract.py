"""The published contract (docs/contract/) matches the code, and every reason is real."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import jsonschema
import pytest

from streamer import contract, errors, schemas
from streamer.errors import DEAD_LETTER_REASONS, REASON_INFO, STAGES, RecordError
from streamer.schemas import DEAD_LETTER_HEADERS, HeaderSpec, Prediction

pytestmark = pytest.mark.timeout(30)

PACKAGE = Path(errors.__file__).resolve().parent
ROOT = PACKAGE.parent


def test_the_committed_contract_is_what_the_code_generates() -> None:
    assert contract.stale() == [], "run: python -m streamer.contract"


def test_a_field_added_without_regenerating_is_drift(monkeypatch: pytest.MonkeyPatch) -> None:
    class Grown(Prediction):
        confidence_interval: float

    monkeypatch.setattr(contract, "Prediction", Grown)
    assert contract.stale() == ["prediction.schema.json"]


def test_a_header_added_without_regenerating_is_drift(monkeypatch: pytest.MonkeyPatch) -> None:
    extra = HeaderSpec("streamer-new", True, {"type": "string"}, "new")
    monkeypatch.setattr(contract, "DEAD_LETTER_HEADERS", (*DEAD_LETTER_HEADERS, extra))
    assert contract.stale() == ["dead-letter-headers.schema.json", "headers.md"]


def test_check_fails_on_an_out_of_date_directory_and_passes_once_written(tmp_path: Path) -> None:
    assert contract.main(["--check", "--dir", str(tmp_path)]) == 1
    assert contract.main(["--dir", str(tmp_path)]) == 0
    assert contract.main(["--check", "--dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(contract.render())


def test_the_published_schemas_are_valid_json_schemas() -> None:
    for name in contract.render():
        if name.endswith(".json"):
            document = json.loads((contract.CONTRACT_DIR / name).read_text())
            jsonschema.Draft202012Validator.check_schema(document)


def test_schema_version_and_type_agree() -> None:
    assert Prediction.model_fields["schema_version"].annotation.__args__ == (  # type: ignore[union-attr]
        schemas.SCHEMA_VERSION,
    )
    assert schemas.PREDICTION_TYPE.endswith(f".v{schemas.SCHEMA_VERSION}")


def test_every_reason_names_known_stages_and_every_error_class_is_published() -> None:
    assert all(set(stages) <= set(STAGES) for stages, _ in REASON_INFO.values())
    classes = [RecordError]
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        assert cls.reason in DEAD_LETTER_REASONS, cls.__name__
        assert cls.stage in REASON_INFO[cls.reason][0], cls.__name__


def _string_constants(tree: ast.AST) -> set[str]:
    return {
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def _literal(node: ast.expr) -> set[str]:
    """The strings an expression can be when it is a literal or a choice of literals."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return _literal(node.body) | _literal(node.orelse)
    return set()


def _reason_literals(tree: ast.AST) -> set[str]:
    """Strings given as ``reason=...`` or assigned to a name or attribute ``reason``."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "reason":
            found |= _literal(node.value)
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = {getattr(t, "id", getattr(t, "attr", None)) for t in targets}
            if "reason" in names:
                found |= _literal(node.value)
    return found


def test_every_reason_the_code_gives_is_published_and_every_published_one_is_given() -> None:
    given: set[str] = set()
    mentioned: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        if path.name == "errors.py":  # leave out the table itself
            tree.body = [n for n in tree.body if "REASON_INFO" not in ast.unparse(n)]
        given |= _reason_literals(tree)
        mentioned |= _string_constants(tree)
    assert given <= set(DEAD_LETTER_REASONS)
    assert set(DEAD_LETTER_REASONS) <= mentioned, "a published reason that nothing raises"


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    return text[start : end if end != -1 else None]


@pytest.mark.parametrize(
    ("doc", "heading"),
    [
        ("docs/OPERATIONS.md", "### StreamerDeadLetterRateHigh"),
        ("README.md", "## Message contract"),
    ],
)
def test_the_docs_name_only_reasons_that_exist(doc: str, heading: str) -> None:
    section = _section((ROOT / doc).read_text(), heading)
    codes = set(re.findall(r"`([a-z]+(?:-[a-z]+)+)`", section))
    headers = {h.name for h in (*schemas.PREDICTION_HEADERS, *DEAD_LETTER_HEADERS)}
    not_reasons = headers | {"at-least-once", "exactly-once", "streamer-replayed-from"}
    unknown = codes - set(DEAD_LETTER_REASONS) - not_reasons
    assert not unknown, f"{doc} names reasons the code never gives: {sorted(unknown)}"


MODEL = schemas.ModelInfo(name="resnet18", weights="random:0", device="cpu", precision="fp32")
TIMINGS = schemas.Timings(
    kafka_ms=1.5,
    permit_wait_ms=0.0,
    decode_ms=2.25,
    batch_wait_ms=1e-06,
    inference_ms=30.0,
    total_ms=35.0,
)


@pytest.mark.parametrize(
    ("input_id", "scores", "extra"),
    [
        ("in/0/3", [0.9, 0.1], False),
        ('ünïcode-id \u2603 "quoted" \\ \n', [1.0, 0.0], True),
        ("nan", [float("nan"), float("inf")], False),
    ],
)
def test_the_hot_path_json_is_the_prediction_model_s_json(
    input_id: str, scores: list[float], extra: bool
) -> None:
    """``prediction_json`` (no model per record) writes what ``Prediction.to_json`` writes."""
    labels = ["tench", "goldfish"]
    fast = schemas.prediction_json(
        input_id,
        ("in", 2, 3, 1700000000000),
        MODEL.model_dump(),
        [(i, labels[i], s) for i, s in enumerate(scores)],
        batch_size=8 if extra else None,
        timings_ms=TIMINGS.model_dump() if extra else None,
    )
    model = Prediction(
        schema_version=1,
        id=input_id,
        source=schemas.Source(topic="in", partition=2, offset=3, timestamp=1700000000000),
        model=MODEL,
        top_k=[schemas.Label(index=i, label=labels[i], score=s) for i, s in enumerate(scores)],
        batch_size=8 if extra else None,
        timings=TIMINGS if extra else None,
    ).to_json()
    assert json.loads(fast) == json.loads(model)
    assert list(json.loads(fast)) == list(json.loads(model))  # the same fields, in order
    fast.decode("utf-8")  # UTF-8, like the model's
