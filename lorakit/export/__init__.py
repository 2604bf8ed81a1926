"""Deploying a fine-tune: GGUF (llama.cpp), Ollama and vLLM, each export verified against the model."""
