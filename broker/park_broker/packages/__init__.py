"""The site's package store: uploaded and index-fetched wheels, installed one directory per (name, version)."""
