"""nanod's supervisor process. It never imports torch (see docs/architecture.md)."""
