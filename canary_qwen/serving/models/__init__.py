"""Python-backend model files of both flavours.

The repository generators copy each model module here to ``<repo>/<model>/1/model.py``. They import
``triton_python_backend_utils``, which exists only inside Triton's python stub: never import them
directly. The logic they share, testable without a server, lives in ``canary_qwen.serving.checks``
and ``canary_qwen.protocol.trt_requests``; ``responses.py`` is their common per-request error handling and the streamed TEXT replies.

| file | model | what |
| --- | --- | --- |
| preprocessing.py | preprocessing | AUDIO + PROMPT -> SAMPLES (the audio, checked) + PROMPT_IDS |
| encoder.py | encoder | AUDIO -> EMBEDDINGS; dynamic ragged batching, one ONNX Runtime run per batch |
| llm.py | llm | PROMPT_IDS + EMBEDDINGS (+ MAX_NEW_TOKENS) -> OUTPUT_IDS; one greedy decode per batch |
| postprocessing.py | postprocessing | OUTPUT_IDS -> TEXT (+ the ids again as TOKEN_IDS) |
| onnx_stream.py | canary_qwen_stream | decoupled: checks, encoder and one greedy decode per batch in its own process, TEXT pieces as tokens come; a cancelled stream stops |
| prompt_table.py | prompt_table (trt) | PROMPT_IDS + EMBEDDINGS -> the tensorrt_llm request: fake ids, prompt embedding table, extra ids |
| trt_stream.py | canary_qwen_stream (trt) | decoupled, one stream per instance inside execute: encoder, prompt_table, then tensorrt_llm streaming (BLS); TEXT pieces as tokens arrive, a cancelled stream stops tensorrt_llm |

postprocessing.py and preprocessing.py serve both flavours (the trt flavour's configs add
AUDIO_LENGTH and SEQUENCE_LENGTH).
"""
