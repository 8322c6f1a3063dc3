"""Generation, streaming and chat on any model tunesmith can load."""
