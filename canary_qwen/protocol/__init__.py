"""What server and client both speak: the TensorRT-LLM prompt-embedding table and its request tensors."""
