"""Export a trained adapter for outside engines: GGUF files (gguf.py), their check against lorakit (verify.py) and an Ollama folder (ollama.py)."""
