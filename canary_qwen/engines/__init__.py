"""In-process engines that decode many requests at once, fed one request at a time.

A :class:`~canary_qwen.engines.base.StepEngine` (torch-fast's scheduler, vLLM, ONNX Runtime in batches) takes
requests between steps and reports each one's new tokens; an :class:`~canary_qwen.engines.loop.EngineLoop`
owns one in a thread and answers each request through its :class:`~canary_qwen.engines.base.Sink`. The Triton
engine model and the OpenAI-compatible server both serve through an ``EngineLoop``.
"""

from .base import AUDIO, CANCELLED, EMBEDDINGS, FAILED, FINISHED, EngineRequest, RequestCounts, Sink, StepEngine
from .loop import EngineLoop

__all__ = [
    "AUDIO",
    "CANCELLED",
    "EMBEDDINGS",
    "FAILED",
    "FINISHED",
    "EngineLoop",
    "EngineRequest",
    "RequestCounts",
    "Sink",
    "StepEngine",
]
