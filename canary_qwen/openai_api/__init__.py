"""An OpenAI-compatible server (``canary-qwen serve-openai``; ``pip install 'canary-qwen[openai]'``).

``POST /v1/audio/transcriptions`` as OpenAI's API and vLLM's ``vllm serve`` offer it, ``POST /v1/chat/completions``
in the model's LLM mode (``chat``, ``chat_protocol``) and ``GET /v1/realtime`` live transcription sessions
(``realtime``, ``realtime_protocol``), answered by running Triton servers (``forwarding.TritonForwarding``) or by an
engine in this process (``local.LocalEngine``). ``protocol`` holds the transcription request's fields, the
response bodies, the stream events and the error shape; ``errors`` the one table from this package's errors to HTTP
statuses; ``formats`` the response formats; ``upload`` the multipart upload parsed as it streams in; ``http`` what
the handlers share; ``app`` the server; ``metrics`` the Prometheus metrics.
"""
