"""Readable text for the answers, one module per area; `text` lays out tables and fields."""
