"""Ground-floor helpers of the whole project: run folders and atomic files, logging, seeding, the recorded command
line, the hub's offline switch. Nothing here imports another package of this project (tests/test_layering.py)."""
