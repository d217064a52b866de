"""Request metrics: counted in plain dicts, exposed by a collector of our own with the names, labels, buckets and
types they always had; summed over workers through their totals files; byte counters from a service's start."""

from __future__ import annotations

import math
import os
from itertools import pairwise
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import DURATION_BUCKETS, MULTIPROC_ENV, Metrics, WorkersRequestCollector

BEFORE = Path(__file__).resolve().parents[2] / "fixtures" / "request_metrics_before.prom"
SAMPLES = (0.0, 0.001, 0.0010001, 0.003, 0.01, 0.2, 0.9999, 1.0, 29.9, 30.0, 31.0, 500.0)
WEB_GET = (("code", "200"), ("method", "GET"), ("route", "web@*any*/"), ("service", "web"))

Key = tuple[str, tuple[tuple[str, str], ...]]


def _scenario(metrics: Metrics) -> None:
    """The traffic behind tests/fixtures/request_metrics_before.prom (written by the code before the collector,
    which handed these counts to prometheus-client's Counter and Histogram objects)."""
    for i, seconds in enumerate(SAMPLES):
        metrics.observe_request("web", "web@*any*/", "GET", 200, seconds, upstream_seconds=seconds / 2,
                                request_bytes=i, response_bytes=100 * i)
    metrics.flush()
    for seconds in SAMPLES[:3]:  # a second batch adds to the first; BREW is no known method: "OTHER"
        metrics.observe_request("web", "web@*any*/", "BREW", 503, seconds)
    metrics.observe_request("api", "api@*any*/v1", "POST", 201, 0.04, 0.03, 512, 0)
    metrics.observe_request("none", "none", "OTHER", 404, 0.0)


def _samples(text: str) -> dict[Key, float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def _histogram_problems(text: str, name: str) -> list[str]:
    """What is wrong with histogram `name` in an exposition: buckets not the DURATION_BUCKETS bounds, counts that
    decrease with `le`, a +Inf bucket that is not the count, a negative or missing sum."""
    problems = []
    bounds = [repr(float(b)) for b in DURATION_BUCKETS] + ["+Inf"]
    series: dict[tuple[tuple[str, str], ...], dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(name) and not s.name.endswith("_created"):
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                suffix = f"le={s.labels['le']}" if s.name.endswith("_bucket") else s.name.removeprefix(name)
                series.setdefault(labels, {})[suffix] = s.value
    for labels, values in series.items():
        les = [k.removeprefix("le=") for k in values if k.startswith("le=")]
        if les != bounds:
            problems.append(f"{labels}: buckets {les}")
            continue
        counts = [values[f"le={le}"] for le in bounds]
        if any(later < earlier for earlier, later in pairwise(counts)):
            problems.append(f"{labels}: not cumulative {counts}")
        if values.get("_count") != counts[-1]:
            problems.append(f"{labels}: _count {values.get('_count')} != +Inf bucket {counts[-1]}")
        if not values.get("_sum", -1.0) >= 0:
            problems.append(f"{labels}: _sum {values.get('_sum')}")
    return problems


class TestExposition:
    """The request metrics' exposition is what prometheus-client's own Counters and Histograms gave."""

    def test_equals_the_exposition_before_the_collector(self) -> None:
        """Same families in the same order, same HELP and TYPE lines, same series in the same order with the
        same values (counts, sums, bucket counts); `_created` series present, as timestamps."""
        metrics = Metrics()
        _scenario(metrics)
        now, before = metrics.exposition().decode(), BEFORE.read_text()
        assert [line for line in now.splitlines() if line.startswith("#")] == [
            line for line in before.splitlines() if line.startswith("#")]
        got, expected = _samples(now), _samples(before)
        assert list(got) == list(expected)
        for key, value in expected.items():
            if key[0].endswith("_created"):
                assert got[key] > 1.5e9, key
            else:
                assert got[key] == pytest.approx(value, rel=1e-12), key

    def test_histograms_expose_what_observe_would(self) -> None:
        """Batched counts expose what a prometheus-client Histogram fed one observe() per request exposes."""
        metrics = Metrics()
        for seconds in SAMPLES:
            metrics.observe_request("web", "web@*any*/", "GET", 200, seconds, upstream_seconds=seconds / 2)
        metrics.flush()
        for seconds in SAMPLES[:3]:
            metrics.observe_request("web", "web@*any*/", "GET", 200, seconds)
        got = {k: v for k, v in _samples(metrics.exposition().decode()).items()
               if k[0].startswith("ferryman_request_duration_seconds") and not k[0].endswith("_created")}

        reference = CollectorRegistry()
        direct = Histogram("ferryman_request_duration_seconds", "x", ["service", "route"],
                           buckets=DURATION_BUCKETS, registry=reference).labels("web", "web@*any*/")
        for seconds in SAMPLES + SAMPLES[:3]:
            direct.observe(seconds)
        expected = {k: v for k, v in _samples(generate_latest(reference).decode()).items()
                    if not k[0].endswith("_created")}
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value), key

    @pytest.mark.parametrize("name", ["ferryman_request_duration_seconds", "ferryman_upstream_duration_seconds"])
    def test_histograms_are_well_formed(self, name: str) -> None:
        """Every duration histogram has the DURATION_BUCKETS bounds, cumulative counts, +Inf equal to its
        count and a sum equal to the observations' sum."""
        metrics = Metrics()
        _scenario(metrics)
        text = metrics.exposition().decode()
        assert _histogram_problems(text, name) == []
        total = _samples(text)[(f"{name}_sum", (("route", "web@*any*/"), ("service", "web")) if "request" in name
                               else (("service", "web"),))]
        observed = sum(SAMPLES) + sum(SAMPLES[:3]) if "request" in name else sum(s / 2 for s in SAMPLES)
        assert math.isclose(total, observed)

    @pytest.mark.parametrize(
        ("line", "replacement", "problem"),
        [
            ('le="0.0025",route="web@*any*/",service="web"} 6.0', 'le="0.0025",route="web@*any*/",service="web"} 2.0',
             "not cumulative"),
            ('_count{route="web@*any*/",service="web"} 15.0', '_count{route="web@*any*/",service="web"} 14.0',
             "_count"),
            ('_bucket{le="1.0",route="web@*any*/",service="web"} 11.0', '_bucket{le="1",route="web@*any*/",'
             'service="web"} 11.0', "buckets"),
        ],
        ids=["per-bucket-not-cumulative", "count-not-inf", "bounds-renamed"],
    )
    def test_a_corrupted_histogram_is_caught(self, line: str, replacement: str, problem: str) -> None:
        """The well-formedness check above finds a histogram corrupted the ways a library change could."""
        text = BEFORE.read_text()
        assert line in text
        problems = _histogram_problems(text.replace(line, replacement), "ferryman_request_duration_seconds")
        assert len(problems) == 1 and problem in problems[0], problems


class TestServiceSeries:
    """A routed service's counters exist from its start, so dashboards show 0 rather than "No data"."""

    def test_a_new_service_has_byte_series_at_zero(self) -> None:
        """new_service() starts request and response bytes (and retries, ejections) at 0; GETs keep the bytes
        at 0; a body adds to them."""
        metrics = Metrics()
        metrics.new_service("web")
        samples = _samples(metrics.exposition().decode())
        for name in ("ferryman_request_bytes_total", "ferryman_response_bytes_total",
                     "ferryman_upstream_retries_total", "ferryman_upstream_ejections_total"):
            assert samples[(name, (("service", "web"),))] == 0, name
        metrics.observe_request("web", "web@*any*/", "GET", 200, 0.01, 0.005)
        samples = _samples(metrics.exposition().decode())
        assert samples[("ferryman_request_bytes_total", (("service", "web"),))] == 0
        metrics.observe_request("web", "web@*any*/", "POST", 200, 0.01, 0.005, 300, 40)
        samples = _samples(metrics.exposition().decode())
        assert samples[("ferryman_request_bytes_total", (("service", "web"),))] == 300
        assert samples[("ferryman_response_bytes_total", (("service", "web"),))] == 40


class TestWorkers:
    """With several workers, each writes its totals to the shared directory and the supervisor adds them up."""

    def test_the_supervisor_sums_every_workers_totals(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Two workers' files (one of a worker since gone) add up to the traffic of both, with no `_created`."""
        monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
        first, second = Metrics(), Metrics()
        _scenario(first)
        first.flush()
        (tmp_path / f"requests-{os.getpid()}.json").rename(tmp_path / "requests-1.json")  # a worker that died
        second.new_service("idle")
        _scenario(second)
        second.flush()

        registry = CollectorRegistry()
        registry.register(WorkersRequestCollector(str(tmp_path)))
        text = generate_latest(registry).decode()
        single = _samples(BEFORE.read_text())
        summed = _samples(text)
        for key, value in single.items():
            if key[0].startswith(("ferryman_request", "ferryman_upstream_duration")) and "_created" not in key[0]:
                assert summed[key] == pytest.approx(2 * value), key
        assert not [key for key in summed if key[0].endswith("_created")]
        assert summed[("ferryman_request_bytes_total", (("service", "idle"),))] == 0
        assert summed[("ferryman_requests_total", WEB_GET)] == 24
        assert _histogram_problems(text, "ferryman_request_duration_seconds") == []
