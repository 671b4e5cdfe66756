"""Models, tokenizers, label space, GGUF cache, LoRA adapters, model parts."""
