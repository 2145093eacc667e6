"""An OpenAI-compatible speech-to-text server (``canary-qwen serve-openai``; ``pip install 'canary-qwen[openai]'``).

``POST /v1/audio/transcriptions`` as OpenAI's API and vLLM's ``vllm serve`` offer it, answered by running Triton
servers (``backends.TritonForwarding``) or by an engine in this process (``backends.LocalEngine``).
``protocol`` holds the request's fields, the response bodies, the stream events and the error shape; ``errors``
the one table from this package's errors to HTTP statuses; ``formats`` the response formats; ``upload`` the
multipart upload parsed as it streams in; ``app`` the handlers; ``metrics`` the Prometheus metrics.
"""
