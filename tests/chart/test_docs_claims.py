"""Claims of the README and docs/ that can be checked against the code, the Makefile and each other.

Each test reads the sentence a user reads and the source of truth it paraphrases, so the next change
to one without the other fails here instead of misleading a user (review issue 18).
"""

from __future__ import annotations

import re
import typing

from streamqueue.metrics import WorkerMetrics
from streamqueue_operator import metrics as operator_metrics
from streamqueue_operator.decide import Decision
from streamqueue_operator.observe import Observation
from streamqueue_operator.status import Snapshot, build

from tests.chart.helm import ROOT

README = (ROOT / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in (ROOT / "docs").glob("*.md")}


def readme_row(first_cell: str) -> str:
    """The README table row whose first cell is ``first_cell``."""
    (row,) = [line for line in README.splitlines() if line.startswith(f"| {first_cell} |")]
    return row


def figures(text: str) -> list[str]:
    """Every measured time in ``text``: "42 ms", "1,101 ms", "2.9 ms"."""
    return re.findall(r"\d[\d,.]*\s?(?:ms|s)\b", text)


def test_readme_fairness_and_cancel_figures_are_the_ones_docs_ai_reports() -> None:
    claims = [
        readme_row("fairness: a light user's message during another's 1,000-message burst"),
        readme_row("cancel → `cancelled` entry at the client"),
        next(p for p in README.split("\n\n") if "spec.worker.fairness: perUser` starts entries" in p),
    ]
    ai = DOCS["ai.md"]
    for claim in claims:
        measured = [f for f in figures(claim) if f not in ("20 ms", "100 ms")]  # the setup and the target
        assert measured, claim
        assert [f for f in measured if f not in ai] == [], f"not in docs/ai.md: {claim}"


def test_readme_lint_row_names_every_step_of_the_make_target() -> None:
    makefile = (ROOT / "Makefile").read_text()
    target = re.search(r"^lint:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert target is not None
    steps = [line.strip().replace("$(VENV)/bin/", "") for line in target.group(1).splitlines()]
    tools = [
        " ".join(step.split()[:2]) if step.startswith(("ruff", "helm")) else step.split()[0] for step in steps
    ]
    assert tools == ["ruff check", "ruff format", "mypy", "helm lint", "actionlint"]
    row = readme_row("`make lint`")
    assert [t for t in tools if t not in row] == []


def test_images_doc_states_the_make_and_the_script_defaults_of_the_base() -> None:
    make_default = re.search(r"^IMAGE_BASE \?= (\w+)$", (ROOT / "Makefile").read_text(), re.M)
    script_default = re.search(r'^BASE="\$\{BASE:-(\w+)\}"$', (ROOT / "hack/images.sh").read_text(), re.M)
    assert make_default is not None and script_default is not None
    images = " ".join(DOCS["images.md"].split())
    assert f"`IMAGE_BASE` defaults to `{make_default.group(1)}`" in images
    assert f"(`BASE={script_default.group(1)}`: `hack/images.sh`'s default when run by hand;" in images
    assert f"the default, `{make_default.group(1)}`" in README


def test_every_test_path_the_docs_and_workflows_cite_exists() -> None:
    texts = [README, *DOCS.values(), *(p.read_text() for p in (ROOT / ".github").rglob("*.yml"))]
    cited = {path for text in texts for path in re.findall(r"\btests/[\w/]+\.py\b", text)}
    assert cited
    assert sorted(p for p in cited if not (ROOT / p).is_file()) == []


def test_every_api_error_operation_is_listed_wherever_the_docs_list_them() -> None:
    operations = typing.get_args(operator_metrics.ApiOperation)
    listings = [
        line
        for doc in ("operator.md", "observability.md")
        for line in " ".join(DOCS[doc].split("\n")).split(". ")
        if "streamqueue_api_errors_total" in line and "`scale`" in line
    ]
    assert len(listings) >= 3
    for listing in listings:
        assert [op for op in operations if f"`{op}`" not in listing] == [], listing


def test_worker_doc_lists_every_metric_the_worker_registers() -> None:
    names = {family.name for family in WorkerMetrics().registry.collect()}
    doc = DOCS["worker.md"]
    assert len(names) >= 10
    assert sorted(n for n in names if f"`{n}" not in doc) == []


def test_readme_conditions_say_what_the_status_reports_for_a_missing_group_and_an_unreachable_redis() -> None:
    def conditions(observation: Observation) -> dict[str, tuple[str, str]]:
        snapshot = Snapshot(
            generation=1, deployment="q-worker", deployment_error=None, observation=observation,
            decision=Decision(1, "GroupMissing", "held"), current=1, ready=1,
            last_scale_time=None, last_scale_reason=None,
        )  # fmt: skip
        return {c["type"]: (c["status"], c["reason"]) for c in build(snapshot, {})["conditions"]}

    missing = conditions(Observation(at=1, group_missing=True))
    down = conditions(Observation(at=1, error="ConnectionError: refused"))
    assert (missing["Ready"], missing["RedisReachable"]) == (("False", "GroupMissing"), ("True", "Reachable"))
    assert (down["Ready"], down["RedisReachable"]) == (
        ("False", "RedisUnavailable"),
        ("False", "ConnectionFailed"),
    )
    ready, reachable = readme_row("`Ready`"), readme_row("`RedisReachable`")
    assert "`GroupMissing`" in ready and "`RedisUnavailable`" in ready
    assert "`ConnectionFailed`" in reachable and "missing group leaves it True" in reachable
    assert "`RedisReachable=False`" not in README
