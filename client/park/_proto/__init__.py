"""Generated wire stubs; regenerate with scripts/gen_protos.py, never edit."""
