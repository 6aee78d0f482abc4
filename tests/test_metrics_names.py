"""/metrics under vLLM's names: what a dashboard written for vLLM (`vllm:` -> `pagellm:`) queries."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from pagellm.engine.engine import EngineStats
from pagellm.entrypoints.openai.metrics import ServerMetrics
from pagellm.outputs import CompletionOutput, RequestMetrics, RequestOutput


def _families(metrics: ServerMetrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}


def _sample(family, suffix: str) -> float:
    return next(s.value for s in family.samples if s.name == family.name + suffix)


def _stats() -> EngineStats:
    return EngineStats(num_running=0, num_waiting=0, kv_cache_usage=0.0, num_used_blocks=0, num_blocks=8,
                       num_preemptions=0, prompt_tokens=5, generation_tokens=3)


def test_per_request_histograms_have_vllms_names_and_values():
    m = ServerMetrics("tiny")
    times = RequestMetrics(arrival_time=100.0, first_scheduled_time=100.5, first_token_time=101.0,
                           last_token_time=103.0, finished_time=103.0)
    out = RequestOutput("r1", None, [1, 2, 3, 4, 5], None,
                        [CompletionOutput(0, "", [7, 8, 9], None, None, finish_reason="length")], True, times)
    m.on_step([out], _stats())
    fams = _families(m)
    expected = {  # name: (sum, count) after one request, in seconds / tokens
        "pagellm:request_queue_time_seconds": (0.5, 1),
        "pagellm:request_prefill_time_seconds": (0.5, 1),
        "pagellm:request_decode_time_seconds": (2.0, 1),
        "pagellm:request_inference_time_seconds": (2.5, 1),
        "pagellm:request_prompt_tokens": (5, 1),
        "pagellm:request_generation_tokens": (3, 1),
        "pagellm:e2e_request_latency_seconds": (3.0, 1),
        "pagellm:time_to_first_token_seconds": (1.0, 1),
    }
    for name, (total, count) in expected.items():
        assert name in fams and fams[name].type == "histogram", name
        assert abs(_sample(fams[name], "_sum") - total) < 1e-9, name
        assert _sample(fams[name], "_count") == count, name
        assert any(s.name == name + "_bucket" and s.labels == {"model_name": "tiny", "le": "+Inf"}
                   for s in fams[name].samples), name


def test_dashboard_names_exist_before_traffic():
    fams = _families(ServerMetrics("tiny"))
    for name, kind in (("pagellm:num_requests_running", "gauge"), ("pagellm:num_requests_waiting", "gauge"),
                       ("pagellm:kv_cache_usage_perc", "gauge"), ("pagellm:prompt_tokens", "counter"),
                       ("pagellm:generation_tokens", "counter"), ("pagellm:request_success", "counter"),
                       ("pagellm:num_preemptions", "counter"), ("pagellm:prefix_cache_queries", "counter"),
                       ("pagellm:prefix_cache_hits", "counter"), ("pagellm:inter_token_latency_seconds", "histogram"),
                       ("pagellm:time_per_output_token_seconds", "histogram"),
                       ("pagellm:request_queue_time_seconds", "histogram"),
                       ("pagellm:request_prompt_tokens", "histogram")):
        assert name in fams and fams[name].type == kind, name
