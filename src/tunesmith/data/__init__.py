"""The data side: files -> Conversation -> rendered, masked TokenizedSample -> packed batches."""
