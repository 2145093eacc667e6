"""Talking to a Triton server running this project's repository: the client and its embeddings mode."""
