"""The decoder (LLM) pipeline: configurations, model resolution, merging and evaluation of the LLM scripts, the grid
search, and the results tables."""
