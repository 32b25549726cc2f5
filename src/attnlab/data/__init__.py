"""Training and evaluation data: shipped corpora, and text turned into token files."""
