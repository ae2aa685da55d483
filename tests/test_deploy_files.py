"""The deployment files in docker/, checked offline: every dashboard query names series the server exports, with
labels they carry and functions that suit their type; Prometheus scrapes the compose server; Grafana's
provisioning matches the compose mounts; compose resolves for both profiles (with `docker-compose`, else skipped);
the Dockerfiles run as non-root with a healthcheck on port 8000 and set only real settings.

`DASHBOARDS`, `dashboard_queries` and `substitute` also serve test_prometheus_live.py, which runs every query
against a real Prometheus."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from engine import EngineInfo, EngineLoad, ProfileInfo, RowCycleStats, SpecCounts, StepStats
from server.metrics import ServerMetrics
from server.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILES = (DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.cuda")
DASHBOARDS = sorted((DOCKER / "grafana" / "dashboards").glob("*.json"))
PROVISIONING = DOCKER / "grafana" / "provisioning"
# What Grafana would put in place of its variables: the live test's window, and every task profile selected.
GRAFANA_VALUES = {"__rate_interval": "30s", "__range": "30s", "__interval": "30s", "task_profile": ".*"}
PROFILES = ("lossless", "math")

VARIABLE = re.compile(r"\$(\w+)")
METRIC = re.compile(r"\b(?:autojudge|http)_\w+")
SELECTOR = re.compile(r"\b((?:autojudge|http)_\w+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"")
GROUPING = re.compile(r"\bby\s*\(([^)]*)\)\s*\(\s*(?:rate\(\s*)?((?:autojudge|http)_\w+)")
RANGE = re.compile(r"\[([^\]]*)\]")
QUANTILE = re.compile(r"histogram_quantile\(\s*[\d.]+\s*,\s*sum by \(([^)]*)\)\s*\(\s*rate\(\s*(\w+)")


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel except rows, including those inside collapsed rows."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panels(panel)
        else:
            yield panel


def dashboard_queries(path: Path) -> list[tuple[str, str]]:
    """(panel title, PromQL expr) of every query of the dashboard at `path`."""
    dashboard = json.loads(path.read_text())
    return [(panel["title"], target["expr"]) for panel in panels(dashboard) for target in panel["targets"]]


def substitute(expr: str, model_name: str) -> str:
    """`expr` as Grafana sends it with `model_name` chosen, all task profiles selected and a 30 s window; any
    other variable is left in place."""
    values = {**GRAFANA_VALUES, "model_name": model_name}
    return VARIABLE.sub(lambda m: values.get(m.group(1), m.group()), expr)


@functools.cache
def exported() -> tuple[dict[str, set[str]], dict[str, str]]:
    """(sample name -> label names, sample name -> family type) of a registry that has seen one engine step and
    one request per profile, so that every series exists."""
    profiles = (ProfileInfo("lossless", 0.0), ProfileInfo("math", 0.3, head_sha256="ab" * 32, layout="DT"))
    info = EngineInfo(
        model_name="m",
        draft_name="int8",
        vocab_size=97,
        max_model_len=256,
        max_slots=2,
        max_waiting=4,
        max_speculative_tokens=4,
        default_speculative_tokens=4,
        bonus_token=True,
        profiles=profiles,
    )
    load = EngineLoad(1, 0, 2, 0.1)
    metrics = ServerMetrics(info, lambda: load)
    window = {"num_spec_steps": 1, "num_draft_tokens": 4}
    exact = SpecCounts(**window, num_accepted_tokens=2, num_recovered=1, accepted_per_pos=(1, 1, 0, 0))
    judged = SpecCounts(
        **window, num_accepted_tokens=4, num_judge_accepted=1, num_judged=1, num_bonus=1, accepted_per_pos=(1,) * 4
    )
    step = StepStats(
        load=load,
        num_prefill_tokens=10,
        num_prefix_query_tokens=14,
        num_prefix_hit_tokens=4,
        num_generated_tokens=8,
        seconds_prefill=0.01,
        seconds_plan=0.0001,
        seconds_draft=0.01,
        seconds_verify=0.02,
        seconds_judge=0.001,
        seconds_step=0.05,
        rows=(RowCycleStats("a", "lossless", exact, 3), RowCycleStats("b", "math", judged, 5)),
        finished=(),
        windows=(4, 0),
        window_profiles=("lossless", "math"),
        predicted_seconds=0.035,
        cost_speed=0.9,
    )
    metrics.observe_step(step)
    metrics.observe_step(dataclasses.replace(step, windows=(0, 0)))  # a step in which no row drafted
    for profile in PROFILES:
        tracker = metrics.track(profile, 5)
        tracker.on_tokens()
        tracker.on_tokens()
        tracker.finish("stop", 4, admitted_at=tracker.arrival)
    metrics.observe_http("/v1/completions", "POST", 200, 0.1)
    labels: dict[str, set[str]] = {}
    kinds: dict[str, str] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
            kinds[sample.name] = family.type
    return labels, kinds


def all_queries() -> list[tuple[str, str]]:
    return [(f"{path.name} / {title}", expr) for path in DASHBOARDS for title, expr in dashboard_queries(path)]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_both_dashboards_are_there():
    titles = {json.loads(p.read_text())["title"] for p in DASHBOARDS}
    assert titles == {"AutoJudge — Overview", "AutoJudge — Speculation & judge"}
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path):
    dashboard = json.loads(path.read_text())
    uid = load_yaml(PROVISIONING / "datasources" / "prometheus.yaml")["datasources"][0]["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"datasource", "model_name", "task_profile"}
    # Every query goes through the `datasource` variable, whose default is the provisioned Prometheus.
    source = variables.pop("datasource")
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    assert source["current"]["value"] == uid
    uid = "${datasource}"
    assert variables["task_profile"]["multi"] and variables["task_profile"]["includeAll"]
    assert variables["task_profile"]["allValue"] == ".*"
    ids = []
    for panel in panels(dashboard):
        ids.append(panel["id"])
        assert panel["targets"], f"{panel['title']} has no query"
        assert panel["datasource"]["uid"] == uid
        assert all(t["datasource"]["uid"] == uid for t in panel["targets"])
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
    assert len(set(ids)) == len(ids)
    for v in variables.values():
        assert v["datasource"]["uid"] == uid
        metric, label = re.fullmatch(r"label_values\((\w+)(?:\{[^}]*\})?, (\w+)\)", v["definition"]).groups()
        assert label in exported()[0][metric], v["name"]


@pytest.mark.parametrize(("where", "expr"), all_queries(), ids=[w for w, _ in all_queries()])
def test_query_names_exported_series(where, expr):
    labels, kinds = exported()
    for m in METRIC.finditer(expr):
        name = m.group()
        assert name in labels, f"{name} is not a series the server exports"
        in_rate = re.search(r"\brate\(\s*$", expr[: m.start()]) is not None
        assert in_rate == (kinds[name] in ("counter", "histogram")), f"{name}: rate() exactly on counters"
    for name, matchers in SELECTOR.findall(expr):
        missing = set(MATCHER.findall(matchers)) - labels[name]
        assert not missing, f"{name} has no label {missing}"
    for grouping, name in GROUPING.findall(expr):
        missing = {g.strip() for g in grouping.split(",") if g.strip()} - labels[name]
        assert not missing, f"{name} has no label {missing} to group by"
    for grouping, name in QUANTILE.findall(expr):
        assert name.endswith("_bucket") and "le" in grouping.replace(" ", "").split(","), "quantiles of buckets by le"
    assert set(RANGE.findall(expr)) <= {"$__rate_interval"}, "windows are $__rate_interval"
    assert "$" not in substitute(expr, "m"), "only the variables the live test substitutes"


def test_prometheus_scrapes_the_compose_server():
    config = load_yaml(DOCKER / "prometheus" / "prometheus.yml")
    compose = load_yaml(COMPOSE)
    datasource = load_yaml(PROVISIONING / "datasources" / "prometheus.yaml")["datasources"][0]
    assert config["global"]["scrape_interval"] == datasource["jsonData"]["timeInterval"] == "5s"
    job, replicas, balancer = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    [target] = [t for c in job["static_configs"] for t in c["targets"]]
    host, port = target.split(":")
    services = compose["services"]
    assert host == "server" and host in services
    assert services["server-cpu"]["networks"]["default"]["aliases"] == [host], "both variants answer as server"
    for name in ("server", "server-cpu"):
        assert any(p.endswith(f":{port}:{port}") for p in services[name]["ports"])
    assert "prometheus.yml:/etc/prometheus/prometheus.yml" in " ".join(services["prometheus"]["volumes"])
    [sd] = replicas["dns_sd_configs"]
    assert sd["names"] == ["server-replica"] and "server-replica" in services and sd["port"] == int(port)
    [lb] = [t for c in balancer["static_configs"] for t in c["targets"]]
    assert lb == "haproxy:8404" and any(p.endswith(":8404:8404") for p in services["haproxy"]["ports"])
    assert datasource["url"] == "http://prometheus:9090"


def test_grafana_provisioning_matches_the_compose_mounts():
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    mounts = dict(v.removesuffix(":ro").split(":") for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    for kind in ("datasources", "dashboards"):
        assert (DOCKER / "grafana" / "provisioning" / kind).is_dir()
    [provider] = load_yaml(PROVISIONING / "dashboards" / "dashboards.yaml")["providers"]
    assert provider["type"] == "file"
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"


def compose_command() -> list[str]:
    """`docker-compose`, or the `docker compose` plugin; skipped without either unless the tools are required."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    reason = "neither docker-compose (Debian package docker-compose) nor the docker compose plugin is installed"
    if os.environ.get("AUTOJUDGE_REQUIRE_DEPLOY_TOOLS") == "1":
        pytest.fail(reason + " while AUTOJUDGE_REQUIRE_DEPLOY_TOOLS=1")
    pytest.skip(reason)


@pytest.mark.parametrize(
    ("profile", "server", "dockerfile"), [("gpu", "server", "Dockerfile.cuda"), ("cpu", "server-cpu", "Dockerfile.cpu")]
)
def test_compose_resolves(profile, server, dockerfile):
    argv = [*compose_command(), "-f", str(COMPOSE), "--profile", profile, "config"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert {server, "prometheus", "grafana"} <= set(services)
    assert services[server]["build"]["dockerfile"].endswith(f"docker/{dockerfile}")
    assert any(v.startswith("model-cache:/cache") for v in _volume_specs(services[server]))
    if profile == "gpu":
        [device] = services[server]["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"]


def test_compose_replicas_profile_puts_haproxy_in_front_with_slots_matched():
    env = {**os.environ, "REPLICAS": "3", "REPLICA_SLOTS": "6"}
    argv = [*compose_command(), "-f", str(COMPOSE), "--profile", "replicas", "config"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    replica, lb = services["server-replica"], services["haproxy"]
    assert replica["deploy"]["replicas"] == 3 and "ports" not in replica  # only the balancer listens outside
    assert str(replica["environment"]["AUTOJUDGE_MAX_SLOTS"]) == str(lb["environment"]["LB_REPLICA_MAXCONN"]) == "6"
    assert float(replica["environment"]["AUTOJUDGE_DRAIN_GRACE"]) > 0
    assert lb["environment"]["LB_REPLICAS_DNS"] == "server-replica"
    assert any("haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg" in v for v in _volume_specs(lb))


def _volume_specs(service: dict[str, Any]) -> list[str]:
    """Volumes as `source:target`, whichever syntax the compose implementation prints."""
    out = []
    for v in service["volumes"]:
        out.append(v if isinstance(v, str) else f"{v['source']}:{v['target']}")
    return out


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, comments dropped and continuation lines joined."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    steps = [line.strip().partition(" ") for line in joined.splitlines() if line.strip()]
    return [(op.upper(), args.strip()) for op, _, args in steps]


def base_images(steps: list[tuple[str, str]]) -> list[str]:
    """The FROM images, with the global ARG defaults (those before the first FROM) filled in."""
    first = next(i for i, (op, _) in enumerate(steps) if op == "FROM")
    defaults = dict(args.split("=", 1) for op, args in steps[:first] if op == "ARG" and "=" in args)
    images = [args.split()[0] for op, args in steps if op == "FROM"]
    return [re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image) for image in images]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile(path):
    steps = instructions(path)
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the server runs as non-root"
    [health] = [args for op, args in steps if op == "HEALTHCHECK"]
    assert "/health" in health
    assert ("EXPOSE", "8000") in steps
    assert ("VOLUME", "/cache") in steps
    assert steps[-1] == ("ENTRYPOINT", '["autojudge-serve"]')
    env = " ".join(args for op, args in steps if op == "ENV")
    for setting in ("AUTOJUDGE_HOST=0.0.0.0", "AUTOJUDGE_PORT=8000", "AUTOJUDGE_CACHE_DIR=/cache"):
        assert setting in env
    assert "engine.model.assets smollm2 --cache-dir /cache" in path.read_text(), "the embedded default is built in"
    images = base_images(steps)
    assert all(re.fullmatch(r"[\w./-]+:[\w.-]*\d[\w.-]*", image) for image in images), f"unpinned: {images}"


def test_cpu_image_pins_the_cpu_torch():
    text = (DOCKER / "Dockerfile.cpu").read_text()
    assert "ARG TORCH_VERSION=2.13.0" in text
    assert '--index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"' in text


def test_environment_names_are_settings():
    known = {ENV_PREFIX + f.name.upper() for f in fields(Settings)} | {ENV_PREFIX + "CONFIG"}
    texts = [p.read_text() for p in DOCKERFILES] + [COMPOSE.read_text()]
    used = {name for text in texts for name in re.findall(rf"\b{ENV_PREFIX}[A-Z_]+", text)}
    assert used and used <= known, used - known
