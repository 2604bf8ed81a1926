"""Publishing to the Hugging Face Hub: the model card, the upload allow-list and secret scan."""
