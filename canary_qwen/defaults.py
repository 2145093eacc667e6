"""Values the whole package agrees on; change them here, nowhere else."""

SAMPLE_RATE = 16000  # Hz; every backend takes 16 kHz mono float32 samples
MAX_NEW_TOKENS = 128  # decoding budget per clip (model card, Open ASR leaderboard)
MAX_WINDOW_S = 40.0  # longest clip the model was trained on; longer audio is cut into windows
MAX_NEW_TOKENS_LIMIT = 512  # the most new tokens a request may ask a server for unless it is set otherwise
# LLM mode (the LoRA off, text in and text out): answers run longer than transcripts, so their budgets are their own.
# The dialogue's tokens and the answer together fit 2048 positions (vLLM's max_model_len here; docs/llm-mode.md).
MAX_ANSWER_TOKENS = 512  # an answer's budget unless the request names one
MAX_ANSWER_TOKENS_LIMIT = 1024  # the most new tokens an LLM-mode request may ask a server for
MAX_PROMPT_TOKENS = 1024  # the longest dialogue (its tokens, system and earlier turns included) a server accepts
MAX_QUEUE = 64  # requests a server holds (waiting or decoding) before it refuses one more
QUEUE_TIMEOUT_S = 60.0  # the longest a request waits in a Triton model's queue before it is refused (0: no limit)
# Share of the GPU memory free after the TensorRT-LLM engine loads that its KV cache takes (TensorRT-LLM's own
# default is 0.9). 0.5 leaves room for the encoder plan, which Triton may load after the LLM; one Canary request
# needs at most max_seq_len (~700) tokens x 112 KiB of bf16 KV cache (Qwen3-1.7B).
KV_CACHE_FRACTION = 0.5
# Where the trt flavour's tensorrt_llm model finds its engine: the repository mounted at /models (NGC's convention,
# docker run -v REPO:/models); the backend opens gpt_model_path as given, never relative to the repository.
ENGINE_DIR_IN_SERVER = "/models/tensorrt_llm/1"
