"""Data: batch format, sources (synthetic, TFDS/local text) and the host-to-device step."""
