"""The server's Prometheus metrics (prometheus-client), in a registry of their own."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30)


class Metrics:
    def __init__(self, max_batch: int):
        r = self.registry = CollectorRegistry()
        p = "sparse_export_"
        self.requests = Counter(p + "requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.tokens = Counter(p + "generated_tokens", "tokens generated", registry=r)
        self.queue = Gauge(p + "queue_length", "requests waiting for a slot", registry=r)
        self.active = Gauge(p + "active_sequences", "sequences in the running batch", registry=r)
        self.max_batch = Gauge(p + "max_batch", "slots (--max-batch)", registry=r)
        self.max_batch.set(max_batch)
        self.occupancy = Histogram(p + "batch_occupancy", "sequences per decode step", registry=r,
                                   buckets=[b + 0.5 for b in range(1, max_batch + 1)])
        self.ttft = Histogram(p + "time_to_first_token_seconds", "request arrival to its first token",
                              registry=r, buckets=LATENCY)
        self.inter_token = Histogram(p + "inter_token_seconds", "time between a request's tokens", registry=r,
                                     buckets=LATENCY)
        # where the scheduler's time goes (the step split): int8 matmuls inside the native step, the rest of the
        # native step (attention, norms, rotary; plus the Python around the call), prefills, and the scheduler's
        # own work (sampling, text, admission)
        self.split = Counter(p + "scheduler_seconds", "scheduler thread time by part", ["part"], registry=r)
        self.step = Histogram(p + "decode_step_seconds", "one batched decode step", registry=r, buckets=LATENCY)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
