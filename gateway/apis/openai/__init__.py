"""OpenAI's Images API: generations, edits and variations, the model list."""
