"""The encoder (GLUE) pipeline: data, metrics, fine-tuning, inference, merging and tables of the GLUE scripts."""
