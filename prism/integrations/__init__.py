"""prism's optimizers inside other training frameworks, one subpackage each (`hf`: the Hugging Face Trainer)."""
