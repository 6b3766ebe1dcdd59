"""Command-line pieces shared by the top-level scripts: the DARE and merge flags, the native-library settings."""
