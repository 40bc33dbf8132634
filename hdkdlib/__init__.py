"""hdkdlib."""
