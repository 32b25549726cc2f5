"""attnlab: transformer attention and the language models built on it, from scratch in PyTorch."""
