"""Shapes of the shipped sft and dpo recipes' models, as in each model's config.json on the Hub, so that the peak
memory a recipe states is checked without a download."""

from __future__ import annotations

# A new recipe on a new model adds its shape here.
MODEL_CONFIGS = {
    "HuggingFaceTB/SmolLM2-135M": dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                                       num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                       vocab_size=49152, tie_word_embeddings=True),
    "HuggingFaceTB/SmolLM2-360M": dict(model_type="llama", hidden_size=960, intermediate_size=2560,
                                       num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                                       vocab_size=49152, tie_word_embeddings=True),
    "Qwen/Qwen2.5-0.5B": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                              num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                              tie_word_embeddings=True),
    "Qwen/Qwen2.5-7B": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                            num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                            tie_word_embeddings=False),
    "meta-llama/Llama-3.1-8B-Instruct": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                             vocab_size=128256, tie_word_embeddings=False),
    "meta-llama/Llama-3.1-70B-Instruct": dict(model_type="llama", hidden_size=8192, intermediate_size=28672,
                                              num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                                              vocab_size=128256, tie_word_embeddings=False),
    "mistralai/Mistral-7B-Instruct-v0.3": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336,
                                               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                               vocab_size=32768, tie_word_embeddings=False),
    "Qwen/Qwen2.5-7B-Instruct": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944,
                                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                     vocab_size=152064, tie_word_embeddings=False),
    "google/gemma-2-2b-it": dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                 num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000,
                                 tie_word_embeddings=True),
}


def model_config(name: str):
    """The transformers config of a shipped recipe's model, built from its shape here."""
    from transformers import AutoConfig

    spec = dict(MODEL_CONFIGS[name])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)
