"""deploy/prometheus: the alert rules load, fire as their unit tests say, and use real metrics."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from conftest import ROOT
from observability import declared_series, promtool, referenced

PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
ALERTS = {r["alert"]: r for g in RULES["groups"] for r in g["rules"] if "alert" in r}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, cwd=PROMETHEUS)


def test_promtool_checks_the_rules_and_the_config() -> None:
    for args in (("check", "rules", "alerts.yml"), ("check", "config", "prometheus.yml")):
        result = run(*args)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_rule_unit_tests_pass() -> None:
    result = run("test", "rules", "alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_broken_expectation_fails_the_unit_tests(tmp_path: Path) -> None:
    # the unit tests are a real check: an alert expected with the wrong labels fails them
    (tmp_path / "alerts.yml").write_text((PROMETHEUS / "alerts.yml").read_text())
    tests = (PROMETHEUS / "alerts.test.yml").read_text()
    assert 'instance: "c:8000"' in tests
    (tmp_path / "alerts.test.yml").write_text(tests.replace('instance: "c:8000"', 'instance: "d"'))
    result = subprocess.run([promtool(), "test", "rules", "alerts.test.yml"],
                            capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert result.returncode != 0


def test_every_operational_concern_has_an_alert_with_a_unit_test() -> None:
    assert {"TinyserveP99OverBudget", "TinyserveHighErrorRate", "TinyserveOverloaded",
            "TinyserveQueueSaturated", "TinyserveModelNotReady", "TinyserveReloadFailed",
            "TinyserveCanaryRolledBack", "TinyserveDown"} <= set(ALERTS)  # fmt: skip
    tested = {
        case["alertname"]
        for test in yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())["tests"]
        for case in test.get("alert_rule_test", ())
    }
    assert set(ALERTS) - tested <= {"TinyserveMemoryHigh"}
    for name, rule in ALERTS.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name


def test_the_rules_use_the_metrics_tinyserve_exposes() -> None:
    expressions = [r["expr"] for g in RULES["groups"] for r in g["rules"]]
    names = referenced(expressions)
    assert "tinyserve_rollout_rollbacks_total" in names
    assert names <= declared_series(), names - declared_series()


def test_the_queue_alert_matches_the_deployed_max_queue() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "k8s" / "base" / "configmap.yaml").read_text())
    max_queue = config["data"]["TINYSERVE_MAX_QUEUE"]
    assert f"0.8 * {max_queue}" in ALERTS["TinyserveQueueSaturated"]["expr"]


def test_the_kubernetes_scrape_job_labels_namespace_and_pod() -> None:
    (job,) = yaml.safe_load((PROMETHEUS / "k8s-scrape.yml").read_text())["scrape_configs"]
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "pod", "__address__", "job"} <= targets
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
