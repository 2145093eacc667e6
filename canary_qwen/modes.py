"""The model's two modes, the words every layer uses for them.

``ASR``: a prompt holding audio, answered through the speech LoRA (transcription, or a question about the audio
in the prompt). ``LLM``: a text-only dialogue answered by the Qwen3 with the LoRA switched off (the model card's
"LLM mode": questions about a transcript, summaries)."""

ASR, LLM = "asr", "llm"
MODES = (ASR, LLM)
