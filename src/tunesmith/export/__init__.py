"""Getting a model out: merged weights, GGUF, Ollama Modelfile, hub push with a model card."""
