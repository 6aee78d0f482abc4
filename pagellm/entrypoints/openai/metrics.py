"""Prometheus metrics for /metrics, with vLLM's names under a `pagellm:` prefix.

Kept in a private CollectorRegistry so that two servers in one process (tests) do not
clash and the default registry's process metrics do not leak in. The async engine feeds
`on_step` / `on_aborted` on the event loop thread; `/metrics` refreshes the gauges from a
fresh EngineStats before rendering.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pagellm.engine.engine import EngineStats
from pagellm.outputs import RequestOutput

CONTENT_TYPE = CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                240.0, 480.0, 960.0)
# vLLM's: 1, 2, 5, 10, 20, 50, ... up to a cap (prompt and output lengths per request).
_TOKEN_BUCKETS = tuple(m * 10 ** e for e in range(7) for m in (1, 2, 5))


class ServerMetrics:
    """The server's Prometheus metrics, labelled with the served model name."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.running = Gauge("pagellm:num_requests_running", "Requests in the running batch.", labels, registry=r)
        self.waiting = Gauge("pagellm:num_requests_waiting", "Requests waiting to be scheduled.", labels, registry=r)
        self.kv_usage = Gauge("pagellm:kv_cache_usage_perc", "KV cache usage (1 = full).", labels, registry=r)
        self.used_blocks = Gauge("pagellm:num_used_blocks", "KV cache blocks in use.", labels, registry=r)
        self.total_blocks = Gauge("pagellm:num_blocks", "KV cache blocks in the pool.", labels, registry=r)
        self.preemptions = Counter("pagellm:num_preemptions", "Requests preempted (recomputed later).", labels,
                                   registry=r)
        self.prompt_tokens = Counter("pagellm:prompt_tokens", "Prefill tokens computed.", labels, registry=r)
        self.generation_tokens = Counter("pagellm:generation_tokens", "Tokens generated.", labels, registry=r)
        self.success = Counter("pagellm:request_success", "Requests finished, by finish reason.",
                               labels + ["finished_reason"], registry=r)
        self.ttft = Histogram("pagellm:time_to_first_token_seconds", "Time from arrival to the first token.",
                              labels, buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("pagellm:inter_token_latency_seconds", "Time between consecutive tokens.",
                             labels, buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("pagellm:e2e_request_latency_seconds", "Time from arrival to the last token.",
                             labels, buckets=_E2E_BUCKETS, registry=r)
        # vLLM's deprecated name for the same per-token gaps; its example Grafana dashboard reads it.
        self.tpot = Histogram("pagellm:time_per_output_token_seconds", "Time per output token (between tokens).",
                              labels, buckets=_ITL_BUCKETS, registry=r)
        self.queue_time = Histogram("pagellm:request_queue_time_seconds", "Time from arrival to first scheduled.",
                                    labels, buckets=_E2E_BUCKETS, registry=r)
        self.prefill_time = Histogram("pagellm:request_prefill_time_seconds",
                                      "Time from first scheduled to the first token.", labels, buckets=_E2E_BUCKETS,
                                      registry=r)
        self.decode_time = Histogram("pagellm:request_decode_time_seconds", "Time from the first token to the last.",
                                     labels, buckets=_E2E_BUCKETS, registry=r)
        self.inference_time = Histogram("pagellm:request_inference_time_seconds",
                                        "Time from first scheduled to the last token.", labels, buckets=_E2E_BUCKETS,
                                        registry=r)
        self.request_prompt_tokens = Histogram("pagellm:request_prompt_tokens", "Prompt tokens per finished request.",
                                               labels, buckets=_TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram("pagellm:request_generation_tokens",
                                                   "Tokens generated per finished request.", labels,
                                                   buckets=_TOKEN_BUCKETS, registry=r)
        self.prefix_queries = Counter("pagellm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      labels, registry=r)
        self.prefix_hits = Counter("pagellm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", labels,
                                   registry=r)
        self._model = model_name
        # Engine totals already counted, so each step adds only its delta.
        self._prompt_seen = self._generation_seen = self._preemptions_seen = 0
        self._prefix_queries_seen = self._prefix_hits_seen = 0
        # request id -> engine time of its latest token, for inter-token latency.
        self._last_token_time: dict[str, float] = {}
        # Export every series (as zero) from the start, so scrapers see them before traffic.
        for metric in (self.running, self.waiting, self.kv_usage, self.used_blocks, self.total_blocks,
                       self.preemptions, self.prompt_tokens, self.generation_tokens, self.ttft, self.itl, self.e2e,
                       self.tpot, self.queue_time, self.prefill_time, self.decode_time, self.inference_time,
                       self.request_prompt_tokens, self.request_generation_tokens, self.prefix_queries,
                       self.prefix_hits):
            metric.labels(model_name)
        for reason in ("stop", "length", "abort"):
            self.success.labels(model_name, reason)

    def on_step(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        """Records a step's outputs (latencies, finish reasons) and the engine's state after it."""
        m = self._model
        for out in outputs:
            metrics = out.metrics
            if metrics is None or metrics.last_token_time is None:
                continue
            previous = self._last_token_time.get(out.request_id)
            if previous is None:
                if metrics.first_token_time is not None:
                    self.ttft.labels(m).observe(max(0.0, metrics.first_token_time - metrics.arrival_time))
            elif metrics.last_token_time > previous:
                self.itl.labels(m).observe(metrics.last_token_time - previous)
                self.tpot.labels(m).observe(metrics.last_token_time - previous)
            self._last_token_time[out.request_id] = metrics.last_token_time
            if out.finished:
                self._last_token_time.pop(out.request_id, None)
                end = metrics.finished_time or metrics.last_token_time
                self.e2e.labels(m).observe(max(0.0, end - metrics.arrival_time))
                self._observe_phases(metrics, end)
                self.request_prompt_tokens.labels(m).observe(len(out.prompt_token_ids))
                self.request_generation_tokens.labels(m).observe(sum(len(c.token_ids) for c in out.outputs))
                # One count per request (an n > 1 request counts once, by its first choice).
                reason = out.outputs[0].finish_reason if out.outputs else None
                self.success.labels(m, reason or "abort").inc()
        self.update_stats(stats)

    def _observe_phases(self, metrics, end: float) -> None:
        """vLLM's queue / prefill / decode / inference split of a finished request's life."""
        m, scheduled, first = self._model, metrics.first_scheduled_time, metrics.first_token_time
        if scheduled is None or first is None:
            return
        self.queue_time.labels(m).observe(max(0.0, scheduled - metrics.arrival_time))
        self.prefill_time.labels(m).observe(max(0.0, first - scheduled))
        self.decode_time.labels(m).observe(max(0.0, end - first))
        self.inference_time.labels(m).observe(max(0.0, end - scheduled))

    def on_aborted(self, request_id: str) -> None:
        self._last_token_time.pop(request_id, None)
        self.success.labels(self._model, "abort").inc()

    def update_stats(self, stats: EngineStats) -> None:
        m = self._model
        self.running.labels(m).set(stats.num_running)
        self.waiting.labels(m).set(stats.num_waiting)
        self.kv_usage.labels(m).set(stats.kv_cache_usage)
        self.used_blocks.labels(m).set(stats.num_used_blocks)
        self.total_blocks.labels(m).set(stats.num_blocks)
        self._prompt_seen = self._add_delta(self.prompt_tokens, stats.prompt_tokens, self._prompt_seen)
        self._generation_seen = self._add_delta(self.generation_tokens, stats.generation_tokens,
                                                self._generation_seen)
        self._preemptions_seen = self._add_delta(self.preemptions, stats.num_preemptions, self._preemptions_seen)
        self._prefix_queries_seen = self._add_delta(self.prefix_queries, stats.prefix_cache_queries,
                                                    self._prefix_queries_seen)
        self._prefix_hits_seen = self._add_delta(self.prefix_hits, stats.prefix_cache_hits, self._prefix_hits_seen)

    def _add_delta(self, counter: Counter, total: int, seen: int) -> int:
        if total > seen:
            counter.labels(self._model).inc(total - seen)
        return max(total, seen)

    def render(self) -> bytes:
        return generate_latest(self.registry)
