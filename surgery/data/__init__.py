"""Data for training and analysis: sources read in bounded pieces, tokens cached on disk, packed
sequences in a seeded order, mixtures of domains. Needs numpy (and a tokenizer from transformers);
nothing here knows about training configs."""
