"""The Feast feature repository: definitions as plain Python objects, and the store configuration."""
