"""Python-backend model files of the onnx flavour.

``generate_onnx_repo`` copies each module here to ``<repo>/<model>/1/model.py``. They import
``triton_python_backend_utils``, which exists only inside Triton's python stub: never import them
directly. The logic they share, testable without a server, lives in ``canary_qwen.triton_repo.serving``.

| file | model | what |
| --- | --- | --- |
| preprocessing.py | preprocessing | AUDIO + PROMPT -> SAMPLES (the audio, checked) + PROMPT_IDS |
| encoder.py | encoder | AUDIO -> EMBEDDINGS; dynamic ragged batching, one ONNX Runtime run per batch |
| llm.py | llm, llm_stream | PROMPT_IDS + EMBEDDINGS (+ MAX_NEW_TOKENS) -> OUTPUT_IDS; one greedy decode per batch; streams tokens when decoupled |
| postprocessing.py | postprocessing | OUTPUT_IDS -> TEXT (+ the ids again as TOKEN_IDS) |
| stream.py | canary_qwen_stream | decoupled BLS: encoder + llm_stream, TEXT pieces as tokens arrive |
"""
