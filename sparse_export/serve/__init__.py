"""An OpenAI-compatible HTTP server over the sparse-cpu runtime with continuous batching (docs/serve.md)."""
