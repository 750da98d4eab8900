"""Measuring deployments: prefill latency and generation speed on each runtime, models timed interleaved."""
