"""Data: the offline corpus and instruction set, the paper's hub datasets, the tokenizer."""
