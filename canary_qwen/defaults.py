"""Values the whole package agrees on; change them here, nowhere else."""

SAMPLE_RATE = 16000  # Hz; every backend takes 16 kHz mono float32 samples
MAX_NEW_TOKENS = 128  # decoding budget per clip (model card, Open ASR leaderboard)
MAX_WINDOW_S = 40.0  # longest clip the model was trained on; longer audio is cut into windows
MAX_PROMPT_TOKENS = 1024  # longest user prompt a server accepts
