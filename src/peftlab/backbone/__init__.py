"""The backbone side: where each model family keeps its sites (anatomy), models by name and shape (zoo), and the
tokenizer that goes with each."""
