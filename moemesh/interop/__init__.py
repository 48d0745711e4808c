"""Other frameworks' formats, in and out (``interop.hf``: Hugging Face checkpoints)."""
