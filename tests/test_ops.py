"""The operations kit in ops/ (issue 15): Prometheus rules checked and unit-tested with
promtool, and every metric the Grafana dashboard and the rules read served by a live pool."""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import trio_securechannel as sc
from trio_securechannel.testing import LoopbackRelay

from helpers import echo
from http_client import request

OPS = Path(__file__).resolve().parent.parent / "ops"
RULES = OPS / "prometheus" / "rules.yml"
RULES_TEST = OPS / "prometheus" / "rules_test.yml"
DASHBOARD = OPS / "grafana" / "trio-securechannel.json"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian's prometheus package has it)"
)

#: Series Prometheus makes itself, per scrape target: not the library's to export.
PROMETHEUS_OWN = frozenset({"up"})
#: Labels Prometheus adds to every series of a target.
TARGET_LABELS = frozenset({"job", "instance"})
_DASHBOARD_FILTER = 'endpoint=~"$endpoint"'


# -- reading PromQL ----------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")  # $__rate_interval, ${endpoint}
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_RANGE = re.compile(r"\[[^\[\]]*\]")
# An identifier not inside a number (1e-05, 5m), and whether a call follows it.
_IDENTIFIER = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"offset", "bool", "inf", "nan"}
)
_LABEL_VALUES = re.compile(r"^label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*([A-Za-z_]\w*)\s*\)$")


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """The metric names and the label names that a PromQL expression reads.

    Strings (label values, regexes, Grafana's variables) go first, then label matchers
    (whose names are labels), grouping clauses (labels too) and range selectors; of the
    identifiers left, calls are functions or aggregations and the rest, keywords aside,
    are metric names.
    """
    text = _GRAFANA_VARIABLE.sub("", _STRING.sub('""', expr))
    labels: set[str] = set()
    for matchers in _MATCHERS.findall(text):
        labels.update(_MATCHER_LABEL.findall(matchers))
    text = _MATCHERS.sub(" ", text)
    for grouping in _GROUPING.findall(text):
        labels.update(name.strip() for name in grouping.split(",") if name.strip())
    text = _RANGE.sub(" ", _GROUPING.sub(" ", text))
    metrics = {
        match[1]
        for match in _IDENTIFIER.finditer(text)
        if not match[2] and match[1].lower() not in _KEYWORDS
    }
    return metrics, labels


def unknown_names(
    exprs: list[str], *, series: set[str], labels: set[str], recorded: set[str]
) -> list[str]:
    """What ``exprs`` read that nothing provides: not a series in ``series``, a recording
    rule's name, nor Prometheus's own ``up``; not a label in ``labels`` nor a target's."""
    unknown: set[str] = set()
    for expr in exprs:
        metrics, used_labels = promql_names(expr)
        unknown |= metrics - series - recorded - PROMETHEUS_OWN
        unknown |= {f"label {name}" for name in used_labels - labels - TARGET_LABELS}
    return sorted(unknown)


# -- the files ---------------------------------------------------------------------------

# rules.yml keeps each rule's expr on the line after its name, on one line (the test that
# counts them holds it to that), so no YAML library is needed to read them.
_RULE = re.compile(r"^ *- (record|alert): (\S+)\n *expr: (.+)$", re.MULTILINE)


def rules() -> list[tuple[str, str, str]]:
    """Each rule in rules.yml as (``record`` or ``alert``, its name, its expr)."""
    return [(kind, name, expr.strip()) for kind, name, expr in _RULE.findall(RULES.read_text())]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_exprs(board: dict[str, Any]) -> list[str]:
    return [
        target["expr"]
        for panel in board["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def variable(board: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = (v for v in board["templating"]["list"] if v["name"] == name)
    return dict(found)


def variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def exported(text: str) -> tuple[set[str], set[str], set[str]]:
    """From an exposition: the series the families declare (by type, with or without
    samples), the series that have samples, and the labels those samples carry."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    declared: set[str] = set()
    present: set[str] = set()
    labels: set[str] = set()
    for family in text_string_to_metric_families(text):
        declared.update(family.name + suffix for suffix in suffixes.get(family.type, [""]))
        for sample in family.samples:
            present.add(sample.name)
            labels.update(sample.labels)
    return declared, present, labels


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False
    )


# -- the rules ---------------------------------------------------------------------------


def test_every_rule_is_read() -> None:
    """The reader above misses no rule: as many as rules.yml names, each with its expr."""
    text = RULES.read_text()
    found = rules()
    assert len(found) == len(re.findall(r"^ *- (?:record|alert):", text, re.MULTILINE))
    assert len(found) == len(re.findall(r"^ *expr:", text, re.MULTILINE))
    assert {kind for kind, _, _ in found} == {"record", "alert"}
    for _, name, expr in found:
        assert expr[0] not in "|>'\"", f"{name}: keep its expr a plain one-line scalar"


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    tested = promtool("test", "rules", str(RULES_TEST))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
    assert "FAILED" not in tested.stdout + tested.stderr


def test_unit_tests_show_every_alert_firing_and_not_and_every_record_evaluated() -> None:
    text = RULES_TEST.read_text()
    cases = re.findall(r"alertname: (\w+)\n *exp_alerts:( \[\])?", text)
    evaluated = " ".join(re.findall(r"^ *- expr: (.+)$", text, re.MULTILINE))
    for kind, name, _ in rules():
        if kind == "alert":
            assert (name, "") in cases, f"{name} is never shown firing"
            assert (name, " []") in cases, f"{name} is never shown not firing"
        else:
            assert re.search(rf"(?<![\w:]){re.escape(name)}(?![\w:])", evaluated), name


@needs_promtool
def test_promtool_catches_a_wrong_expectation(tmp_path: Path) -> None:
    """The unit tests can fail: one expected value changed, promtool says so."""
    (tmp_path / "rules.yml").write_text(RULES.read_text())
    original = RULES_TEST.read_text()
    broken = original.replace("value: 2.425", "value: 2.5", 1)
    assert broken != original
    (tmp_path / "rules_test.yml").write_text(broken)
    tested = promtool("test", "rules", str(tmp_path / "rules_test.yml"))
    assert tested.returncode == 1
    assert "FAILED" in tested.stdout + tested.stderr


# -- the dashboard -----------------------------------------------------------------------


def test_dashboard_is_an_importable_grafana_dashboard() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36
    assert board["uid"]
    assert board["title"]
    assert board["id"] is None  # Grafana assigns one on import
    datasource = variable(board, "datasource")
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    endpoint = variable(board, "endpoint")
    assert endpoint["type"] == "query"
    assert endpoint["multi"] is True
    assert endpoint["includeAll"] is True
    assert endpoint["allValue"] == ".*"
    assert endpoint["datasource"]["uid"] == "${datasource}"
    match = _LABEL_VALUES.match(variable_query(endpoint))
    assert match is not None
    assert match[2] == "endpoint"
    panels = board["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        targets = panel["targets"]
        assert targets, panel["title"]
        assert len({target["refId"] for target in targets}) == len(targets)
        for target in targets:
            assert target["datasource"]["uid"] == "${datasource}"
            metrics, _ = promql_names(target["expr"])
            # Every panel follows the endpoint picker (securechannel_up has no endpoint).
            if metrics != {"securechannel_up"}:
                assert _DASHBOARD_FILTER in target["expr"], (panel["title"], target["expr"])


async def test_dashboard_reads_only_what_the_library_exports_and_the_rules_record(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    """Against the families a pool declares, whether or not they have samples yet."""
    async with sc.open_pool(relay.target, ssl_context=client_context) as pool:
        declared, _, _ = exported(pool.metrics_text().decode())
    assert "securechannel_errors_total" in declared
    assert "securechannel_round_trip_seconds_bucket" in declared
    board = dashboard()
    recorded = {name for kind, name, _ in rules() if kind == "record"}
    match = _LABEL_VALUES.match(variable_query(variable(board, "endpoint")))
    assert match is not None
    assert match[1] in declared
    used: set[str] = set()
    for expr in dashboard_exprs(board):
        used |= promql_names(expr)[0]
    assert used - declared - recorded == set()
    assert used & recorded, "the dashboard uses the recording rules"


@needs_promtool
def test_every_dashboard_expression_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel's query (Grafana's variables filled in)."""
    exprs = [
        expr.replace("$__rate_interval", "5m").replace("$endpoint", ".*")
        for expr in dashboard_exprs(dashboard())
    ]
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for number, expr in enumerate(exprs):
        lines += [f"      - record: dashboard:query_{number}", f"        expr: {json.dumps(expr)}"]
    (tmp_path / "dashboard.yml").write_text("\n".join(lines) + "\n")
    checked = promtool("check", "rules", str(tmp_path / "dashboard.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in checked.stdout


# -- names against a live pool ------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "metrics", "labels"),
    [
        (
            'sum by (endpoint, kind) (rate(securechannel_errors_total{endpoint=~"$endpoint"}'
            "[$__rate_interval]))",
            {"securechannel_errors_total"},
            {"endpoint", "kind"},
        ),
        (
            "histogram_quantile(0.99, sum(rate(a_seconds_bucket[5m] offset 1m)) by (le))",
            {"a_seconds_bucket"},
            {"le"},
        ),
        ('up{job=~"relay_pool|.*securechannel.*"} == 0', {"up"}, {"job"}),
        (
            'a:b:rate5m{kind="not_a_metric{x}"} > 1e-05 and on (instance) bool c_total',
            {"a:b:rate5m", "c_total"},
            {"kind", "instance"},
        ),
        ("label_replace(x, 'dst', '$1', 'src', '(.*)')", {"x"}, set()),
    ],
)
def test_promql_names(expr: str, metrics: set[str], labels: set[str]) -> None:
    assert promql_names(expr) == (metrics, labels)


async def test_a_live_pool_serves_every_metric_the_dashboard_and_rules_read(
    relay: LoopbackRelay, client_context: ssl.SSLContext
) -> None:
    """Scraped over HTTP after traffic, a refused checkout, an error and a closed channel,
    so that the labelled series (errors by kind, closes by reason) exist."""
    options: dict[str, Any] = {"metrics_port": 0, "max_connections": 2, "max_line_length": 8}
    async with sc.open_pool(relay.target, ssl_context=client_context, **options) as pool:
        for _ in range(3):
            async with pool.connection() as channel:
                assert await echo(channel, b"ping\n") == b"ping\n"
        async with pool.connection(), pool.connection():
            with pytest.raises(sc.PoolExhausted):
                async with pool.connection():
                    pass
        async with pool.connection() as channel:
            await channel.send_all(b"a line longer than eight bytes\n")
            with pytest.raises(sc.ProtocolError):  # an error of kind too_big: the channel goes
                await channel.receive_line()
        assert pool.metrics_address is not None
        scraped = await request(pool.metrics_address, "/metrics")
    assert scraped.status == 200
    body = scraped.body.decode()
    assert re.search(r'^securechannel_errors_total\{[^}]*kind="too_big"[^}]*\} 1\.0$', body, re.M)
    assert re.search(r'^securechannel_connections_closed_total\{[^}]*reason="error"', body, re.M)
    _, series, labels = exported(body)
    assert {"securechannel_errors_total", "securechannel_connections_closed_total"} <= series
    assert {"endpoint", "kind", "reason", "state", "le"} <= labels

    board = dashboard()
    recorded = {name for kind, name, _ in rules() if kind == "record"}
    exprs = [expr for _, _, expr in rules()] + dashboard_exprs(board)
    match = _LABEL_VALUES.match(variable_query(variable(board, "endpoint")))
    assert match is not None
    assert match[1] in series
    assert match[2] in labels
    assert unknown_names(exprs, series=series, labels=labels, recorded=recorded) == []

    # The check can fail: a misspelt metric, recording rule or label is reported.
    misspelt = [
        "rate(securechannel_error_total[5m])",
        'instance_endpoint:securechannel_pool_exhaust:rate5m{endpoint=~"$endpoint"} > 0',
        "sum by (endpoint, kinds) (rate(securechannel_errors_total[5m]))",
    ]
    assert unknown_names(misspelt, series=series, labels=labels, recorded=recorded) == [
        "instance_endpoint:securechannel_pool_exhaust:rate5m",
        "label kinds",
        "securechannel_error_total",
    ]


_RATE_OF = re.compile(r"\b(?:rate|irate|increase)\(\s*([A-Za-z_:][\w:]*)")
_COUNTER_SUFFIXES = ("_total", "_bucket", "_count", "_sum")
_QUANTILE = re.compile(r"histogram_quantile\(\s*[\d.]+\s*,(.*)\)", re.DOTALL)


def misused(exprs: list[str]) -> list[str]:
    """PromQL that parses but lies: a rate of a gauge, a quantile that summed ``le`` away."""
    found: list[str] = []
    for expr in exprs:
        found += [
            f"rate of a gauge: {name}"
            for name in _RATE_OF.findall(expr)
            if not name.endswith(_COUNTER_SUFFIXES)
        ]
        for inner in _QUANTILE.findall(expr):
            groupings = _GROUPING.findall(inner)
            recorded_with_le = re.search(r"\b\w*le\w*:\w+_bucket:", inner)
            if not recorded_with_le and not any(
                "le" in {label.strip() for label in grouping.split(",")} for grouping in groupings
            ):
                found.append(f"quantile without le: {expr}")
    return found


def test_no_rate_of_a_gauge_and_no_quantile_without_le() -> None:
    exprs = [expr for _, _, expr in rules()] + dashboard_exprs(dashboard())
    assert any("histogram_quantile" in expr for expr in exprs)  # the check has work to do
    assert misused(exprs) == []
    # The check can fail: each of these parses, and each is wrong.
    wrong = [
        'sum by (endpoint) (rate(securechannel_connections{state="idle"}[5m]))',
        "histogram_quantile(0.99, sum by (endpoint)"
        " (rate(securechannel_round_trip_seconds_bucket[5m])))",
    ]
    assert misused(wrong) == [
        "rate of a gauge: securechannel_connections",
        f"quantile without le: {wrong[1]}",
    ]
