"""llama3-ops: provision a Llama 3 course host and run its stages."""
__version__ = "0.1.0"
